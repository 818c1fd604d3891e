"""Representation probes of the MeSH paper (Sec. 2, 4.1; Figs. 3-5): update magnitude, CKA, spectra."""
