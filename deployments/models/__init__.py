"""Model folders: presets built by our code, paths resolved, each stage's part loaded.

loading (resolve a model spec, load UNet / VAE / CLIP / tokenizer / scheduler / adapter),
builder (build a preset's diffusers folder from configs/models/NAME.yaml, read as package
data of `fusionserve_configs`), clip_vocab (the real CLIP BPE vocabulary). Imports no other
package of this project, except the pruned variant loader of deployments.denoiser.pruning,
lazily."""
