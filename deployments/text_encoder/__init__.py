"""Stage 2: CLIP text encoder with a paged, exact prefix cache, and the image-prompt encoder.

engine (TextEncoderEngine), settings (TextEncoderSettings and its parts), block_pool (hashed
blocks, ref counts, LRU, byte budget), prefix_forward (the forward that starts after a cached
prefix), watchdog (hit-rate guard), image_prompt (reference face -> IP-Adapter embedding),
router (prefix-affinity request router, imported by Ray Serve), metrics and deployment (Ray
only, imported lazily). May import deployments.models and deployments.common."""
