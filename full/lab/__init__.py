"""The CPU image lab: every objective of minipref aligns a tiny, locally pretrained text-to-image model through the
real `full/` entry points (`python -m full.lab`; docs/lab.md)."""
