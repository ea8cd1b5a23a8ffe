"""visedit — attribution analysis and visual-representation editing for vision-language LLMs (VisEdit, AAAI-25)."""

__version__ = "0.1.0"
