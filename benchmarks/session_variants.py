"""Session variants named in a policy spec, shared by the benchmarks that compare them
(``eval_demo.py``, ``frames_held.py``, ``bench_gpu.py``): ``h2o+pyramid`` is the policy ``h2o``
with the staged visual-token drop on."""
from __future__ import annotations

from weight_settings import SESSION_SETTINGS


def session_variant(spec: str) -> tuple[str, dict]:
    """A policy spec's session suffixes: ``+merge`` (evicted visual entries merged, LOOK-M's
    ``visual_tokens.merge``), ``+poolN`` (each frame's visual tokens pooled N x N,
    ``visual_tokens.pool``), ``+pyramid`` (the staged visual-token drop at four equal stages
    keeping half at each, PyramidDrop's default: ``visual_tokens.drop_layers: auto``; ``+drop15-22``
    at layers 15 and 22, ``+keep0.25`` a quarter kept at each) and
    ``+int8`` / ``+int4`` / ``+auto`` (the decoder's projections packed, the node's ``weights``;
    ``auto`` on the demo VLM: SmolLM2's own Q4_1 blocks plus float LoRA factors; ``+int8-x8`` /
    ``+int4-x8`` with each packed product's input rounded to int8 as the GPU's decode rounds it,
    weight_settings.py), ``+vision8`` /
    ``+vision4`` (the tower and projector packed int8 / int4, the node's ``vision_weights``),
    ``+kv8`` (the cache in int8, the node's ``kv_cache_dtype: int8``), e.g.
    ``h2o+pool2+merge``. Streams keep the frames of the unpooled model, so a pooled run answers
    the same questions over the same stream in fewer slots."""
    parts = spec.split("+")
    config: dict = {}
    for suffix in parts[1:]:
        if suffix == "merge":
            config["merge_evicted"] = True
        elif suffix.startswith("pool") and suffix[4:].isdigit():
            config["visual_pool"] = int(suffix[4:])
        elif suffix == "pyramid":
            config["drop_layers"] = "auto"
        elif suffix.startswith("drop") and all(part.isdigit() for part in suffix[4:].split("-")):
            config["drop_layers"] = tuple(int(part) for part in suffix[4:].split("-"))
        elif suffix.startswith("keep"):
            config["drop_keep"] = float(suffix[4:])
        elif suffix in SESSION_SETTINGS:
            config["weights"] = suffix
        elif suffix in ("vision8", "vision4"):
            config["vision_weights"] = f"int{suffix[6:]}"
        elif suffix == "kv8":
            config["kv_cache_dtype"] = "int8"
        else:
            raise ValueError(f"unknown session suffix +{suffix} in {spec!r} "
                             f"(+merge, +poolN, +pyramid, +dropA-B, +keepX, +{', +'.join(SESSION_SETTINGS)}, +vision8, "
                             "+vision4, +kv8)")
    return parts[0], config
