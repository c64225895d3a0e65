"""Small pieces more than one stage (or the ingress) uses: the serial executor (one OS thread
per engine) and the VAE scale factor (one source for image size <-> latent grid). Imports
nothing else of this project."""
