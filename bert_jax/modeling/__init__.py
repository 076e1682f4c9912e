"""Model definitions: configs, the attention core, layers, BERT-family modules and heads."""
