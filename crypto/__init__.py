"""memfed.crypto: signing, sealing, watermarking, key files. No torch import at module level."""
