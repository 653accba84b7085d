"""Every intermediate of a transformer teacher under the golden ``.npz`` names (test helper)."""
from __future__ import annotations

import jax

from l2s_jax import layers


def vit(m, images: jax.Array) -> dict[str, jax.Array]:
    """timm ViT module names: ``embed``, ``blocks_i``, ``tokens_pre/post_norm``, ``pre_logits``, ``logits``."""
    out: dict[str, jax.Array] = {"embed": m.embed(images)}
    blocks = m.forward_stages(images)
    out.update({f"blocks_{i}": x for i, x in enumerate(blocks)})
    out["tokens_pre_norm"] = blocks[-1]
    out["tokens_post_norm"] = m.final_norm(blocks[-1])
    out["pre_logits"] = m.forward_head(out["tokens_post_norm"], pre_logits=True)
    out["logits"] = m.forward_head(out["tokens_post_norm"])
    return out


def swin(m, images: jax.Array) -> dict[str, jax.Array]:
    """timm Swin module names: ``patch_embed``, ``layers_i``, ``final_norm``, ``pre_logits``, ``logits``."""
    out: dict[str, jax.Array] = {"patch_embed": m.patch_embed(images)}
    stages = m.forward_stages(images)
    out.update({f"layers_{i}": x for i, x in enumerate(stages)})
    out["final_norm"] = m.final_norm(stages[-1])
    out["pre_logits"] = layers.global_avg_pool(out["final_norm"])
    out["logits"] = m.forward_head(out["final_norm"])
    return out


def cswin(m, images: jax.Array) -> dict[str, jax.Array]:
    """CSWin golden names as row-major tokens ``(N, HW, C)``: ``stem``, ``stageK``, ``final_norm``, ``pooled``, ``logits``."""
    def tokens(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    out: dict[str, jax.Array] = {"stem": tokens(m.stem(images))}
    stages = m.forward_stages(images)
    out.update({f"stage{s + 1}": tokens(x) for s, x in enumerate(stages)})
    normed = m.final_norm(stages[-1])
    out["final_norm"] = tokens(normed)
    out["pooled"] = m.forward_head(normed, pre_logits=True)
    out["logits"] = m.forward_head(normed)
    return out
