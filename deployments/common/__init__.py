"""Small pieces more than one stage uses: the serial executor (one OS thread per engine).
Imports nothing else of this project."""
