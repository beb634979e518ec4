"""The empty-prompt context, from the checkpoint's own text encoder (``cond_stage_model``).

LumiNet conditions on no prompt: both branches of guidance get the OpenCLIP ViT-H-14 encoding
of ``""`` (the penultimate layer of the text transformer, then the final layer norm;
``77 x 1024``). It is computed once from the ``cond_stage_model.model.*`` tensors of the
checkpoint. The empty string needs no vocabulary: its tokens are start-of-text,
end-of-text, then padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import RelighterError

PREFIX = "cond_stage_model.model."
#: OpenCLIP's start-of-text and end-of-text tokens; padding is 0.
SOT, EOT = 49406, 49407
HEAD_WIDTH = 64  # ViT-H-14's text tower: width 1024, 16 heads


def empty_prompt_tokens(length: int = 77) -> torch.Tensor:
    tokens = torch.zeros(1, length, dtype=torch.long)
    tokens[0, 0], tokens[0, 1] = SOT, EOT
    return tokens


@torch.no_grad()
def empty_prompt_context(text: dict[str, torch.Tensor], skip_last: int = 1) -> torch.Tensor:
    """``1 x 77 x width``: the text transformer on the empty prompt, its last ``skip_last``
    blocks left out ("penultimate"), then ``ln_final``; in float32 on the CPU."""
    w = {k[len(PREFIX):]: v.float() for k, v in text.items() if k.startswith(PREFIX)}
    if "token_embedding.weight" not in w:
        raise RelighterError("luminet: the checkpoint has no text encoder "
                             "(cond_stage_model.*), so the empty-prompt context cannot be "
                             "computed: give one with -O context=FILE.safetensors")
    blocks = sorted({int(k.split(".")[2]) for k in w if k.startswith("transformer.resblocks.")})
    tokens = empty_prompt_tokens(w["positional_embedding"].shape[0])
    x = F.embedding(tokens, w["token_embedding.weight"]) + w["positional_embedding"]
    n, width = x.shape[1], x.shape[2]
    heads = width // HEAD_WIDTH
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in blocks[: len(blocks) - skip_last]:
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = F.linear(h, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.reshape(1, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        a = a.transpose(1, 2).reshape(1, n, width)
        x = x + F.linear(a, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])),
                     w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = x + h
    return F.layer_norm(x, (width,), w["ln_final.weight"], w["ln_final.bias"])
