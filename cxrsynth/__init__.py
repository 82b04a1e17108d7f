"""cxrsynth: versioned real and synthetic chest X-ray datasets and the experiments of
Khosravi et al., "Synthetically enhanced" (eBioMedicine 2024)."""

__version__ = "0.1.0"
