"""smoe_lab: a workbench for studying and shrinking sparse mixture-of-experts GPT-2 models."""

__version__ = "0.1.0"
