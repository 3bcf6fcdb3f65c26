"""The model's loss on conversations over their supervised tokens, masked by the one renderer as training masks
them: the held-out loss of `sftlab eval` and the retention check's loss rise on the base's own replies."""

import torch
from tqdm.auto import tqdm

from sftlab.chat_format import IGNORE_INDEX, ChatRenderer


def heldout_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                 progress: str | None = None, tools: list | None = None) -> float:
    """Mean cross-entropy over the supervised tokens (the replies and their terminators), as in training.
    `tools`: per conversation, its tools or None."""
    losses = sample_losses(model, tokenizer, conversations, batch_size, progress, tools)
    return sum(total for total, _ in losses) / max(sum(tokens for _, tokens in losses), 1)


@torch.no_grad()
def sample_losses(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                  progress: str | None = None, tools: list | None = None) -> list[tuple[float, int]]:
    """Per conversation: the summed cross-entropy over its supervised tokens, and how many there are."""
    renderer = ChatRenderer(tokenizer)
    samples = [renderer.render(c, t) for c, t in zip(conversations, tools or [None] * len(conversations))]
    results = []
    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc=progress, unit="batch", leave=False,
                      disable=not progress):
        batch = samples[start:start + batch_size]
        width = max(len(s.input_ids) for s in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sample in enumerate(batch):
            ids[row, :len(sample.input_ids)] = torch.tensor(sample.input_ids)
            labels[row, :len(sample.labels)] = torch.tensor(sample.labels)
            mask[row, :len(sample.input_ids)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        shifted = labels[:, 1:].to(model.device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX,
                                                 reduction="none")
        counts = (shifted != IGNORE_INDEX).sum(dim=1)
        results += [(float(total), int(n)) for total, n in zip(loss.sum(dim=1).tolist(), counts.tolist())]
    return results
