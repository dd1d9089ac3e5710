"""Ray Serve adapters around pipeline/: Ingress, TextEncoder, Diffuser, Upscaler, Publisher."""
