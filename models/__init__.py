"""Model definitions: named presets (no torch), reference GPT/BERT modules and transformers builders.

`models.presets` imports no torch so that the calculator runs anywhere; the modules that build
`nn.Module`s are imported on demand.
"""
