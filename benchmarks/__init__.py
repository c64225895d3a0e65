"""Benchmarks: each module measures one claim of the README and rewrites its table.

Run from the checkout's root as `python -m benchmarks.NAME [--quick] [--json PATH]
[--update-readme README.md]`. readme_table holds where results go and how a README section
is rewritten, stats the one percentile definition every table uses. Modules here may import
serve_app and deployments; nothing imports benchmarks.
"""
