"""The Stable Diffusion VAE's geometry and our exact tiled VAE (`restorecli.vae.tiled`)."""

#: Pixels per latent pixel of the SD VAE (three 2x downsamplings).
VAE_SCALE = 8
