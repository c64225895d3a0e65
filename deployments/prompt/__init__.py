"""Stage 1, CPU only: a wordy instruction -> a compact structured prompt.

optimizer (the engine), parser (instruction -> attributes), attributes (key -> list of
values, and how the prompt and the API say them), lexicon (the rules, compiled from
data/lexicon.yaml), settings (PromptSettings), deployment (the Ray wrapper). May import
deployments.models and deployments.text_encoder.block_pool (the routing key shares the
cache's block hash and block size)."""
