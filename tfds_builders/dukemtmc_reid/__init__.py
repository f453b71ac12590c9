"""dukemtmc_reid: TFDS builder of the manual download (see its MANUAL_DOWNLOAD_INSTRUCTIONS)."""
