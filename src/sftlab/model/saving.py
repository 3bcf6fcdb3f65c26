"""How sftlab writes a tokenizer into a model or run folder, as the ecosystem reads it: the embedded models, runs,
merged models and exports all save through here."""

from pathlib import Path


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Saves with the chat template inside tokenizer_config.json, where the ecosystem looks for it."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    (Path(out_dir) / "chat_template.jinja").unlink(missing_ok=True)  # an older copy would take precedence
