"""Built-in model cards (package data): one TOML file per model, read by ``skulk.modelcards``."""
