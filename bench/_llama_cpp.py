"""llama.cpp as a benchmark peer, through `llama-cpp-python` (its C API via ctypes), on the
benchmark's own random checkpoint written as GGUF with the `gguf` package.

Both are optional, bench-only dependencies (`pip install -e .[bench]`; llama-cpp-python
compiles llama.cpp from source, ~20 min on 2 cores): nothing in the library or its tests
imports this module, and a benchmark that finds them missing skips its llama.cpp cases with
`missing()`'s note.

  - `write_f32_gguf(hf_dir, path)`: a Hugging Face `GemmaForCausalLM` safetensors checkpoint
    as a float32 GGUF of llama.cpp's "gemma" architecture (tensor names from gguf's own
    name map; the RMSNorm scales get the +1 that HF Gemma applies at run time, as llama.cpp's
    converter does; a placeholder SentencePiece vocabulary, since the benchmark feeds token
    ids and never text).
  - `quantize(src, dst, type)`: BF16 / Q8_0 / Q4_0 from that file with llama.cpp's own
    `llama_model_quantize`, `pure` (every matrix, the tied embedding/head included, in the
    named type; llama-quantize's default mixture would keep the head in Q6_K for Q4_0).
  - `tensor_summary(path)`: the bytes its tensors hold and their types.
  - `Runner`: greedy generation of a batch of token-id prompts, one sequence per row.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import pathlib

# Our weight formats -> the GGUF tensor type the llama.cpp peer stores them in.
TYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
# llama_ftype values (llama.h) of the quantized files.
_FTYPES = {"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_0": 2}
BLOCKS = {"Q8_0": 32, "Q4_0": 32}  # elements per scale in ggml's block formats


def missing() -> str | None:
    """Why the llama.cpp cases cannot run here (None when they can). Only looks the packages
    up: importing llama_cpp loads the compiled library."""
    absent = [name for name, module in (("llama-cpp-python", "llama_cpp"), ("gguf", "gguf"))
              if importlib.util.find_spec(module) is None]
    if absent:
        return (f"llama.cpp cases skipped: {' and '.join(absent)} not installed (optional, "
                "bench only: `pip install -e .[bench]`, which builds llama.cpp from source, "
                "~20 min on 2 cores)")
    return None


def version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        return "-"


# ---- writing the weights ------------------------------------------------------------------
def write_f32_gguf(hf_dir, path):
    """The safetensors checkpoint in `hf_dir` as a float32 GGUF at `path`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    hf_dir = pathlib.Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "gemma":
        raise ValueError(f"only Gemma 1 checkpoints are written here, not "
                         f"{config.get('model_type')!r}")
    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, layers)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA])
    writer.add_name("gemma_keras benchmark (random weights)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_file_type(_FTYPES["F32"])
    _add_placeholder_vocab(writer, config)

    for hf_name, array in tensors.items():
        if hf_name == "lm_head.weight":  # tied: llama.cpp reads token_embd as the head
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        array = np.asarray(array, np.float32)
        if hf_name.endswith("norm.weight"):
            array = array + 1.0  # HF Gemma's RMSNorm multiplies by (1 + weight)
        # [out, in] row-major as in HF: ggml reads it as ne = [in, out], its matrix layout.
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_placeholder_vocab(writer, config):
    """A SentencePiece-type vocabulary of the checkpoint's size with distinct placeholder
    pieces and Gemma's special ids (pad 0, eos 1, bos 2, unk 3), so llama.cpp loads it."""
    import gguf

    vocab = config["vocab_size"]
    special = {config.get("pad_token_id", 0): "<pad>", config.get("eos_token_id", 1): "<eos>",
               config.get("bos_token_id", 2): "<bos>", 3: "<unk>"}
    tokens, types = [], []
    for i in range(vocab):
        tokens.append(special.get(i, f"<t{i}>"))
        types.append(gguf.TokenType.UNKNOWN if i == 3 else
                     gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_pad_token_id(config.get("pad_token_id", 0))
    writer.add_eos_token_id(config.get("eos_token_id", 1))
    writer.add_bos_token_id(config.get("bos_token_id", 2))
    writer.add_unk_token_id(3)
    writer.add_add_space_prefix(False)


def quantize(src, dst, gguf_type: str, threads: int = 2):
    """`src` (a float32 GGUF) re-written in `gguf_type` (BF16, Q8_0, Q4_0) by llama.cpp."""
    import llama_cpp

    _quiet(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = _FTYPES[gguf_type]
    params.pure = True
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                          ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {gguf_type}) returned {code}")


def tensor_summary(path) -> dict:
    """{'bytes': the bytes of all tensors' data, 'file_bytes', 'params', 'types': {type:
    tensors}} of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"bytes": int(sum(int(t.n_bytes) for t in reader.tensors)),
            "file_bytes": os.path.getsize(path),
            "params": int(sum(int(t.n_elements) for t in reader.tensors)),
            "types": types}


def ensure_ggufs(directory, types, run_make) -> dict:
    """{type: path} of the GGUF files for `types` under `directory`, each built once (the F32
    file first, the others from it) by `run_make(gguf_type, path, f32_path)` in a fresh
    process; the caller wipes `directory` when the checkpoint changes."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for gguf_type in ["F32"] + [t for t in types if t != "F32"]:
        path = directory / f"{gguf_type.lower()}.gguf"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            run_make(gguf_type, tmp, directory / "f32.gguf")
            tmp.rename(path)
        paths[gguf_type] = str(path)
    return {t: paths[t] for t in types}


# ---- running ------------------------------------------------------------------------------
_LOG_SINK = []


def _quiet(llama_cpp):
    """llama.cpp logs every load to stderr: drop it (the callback must stay referenced)."""
    if not _LOG_SINK:
        _LOG_SINK.append(llama_cpp.llama_log_callback(lambda level, text, user: None))
        llama_cpp.llama_log_set(_LOG_SINK[0], ctypes.c_void_p(0))


class Runner:
    """One GGUF model; greedy generation of a batch of prompts (token ids, one llama.cpp
    sequence per row), on the CPU with `threads` threads. A context per batch size, made
    at that batch's first call; its KV cache is cleared at the start of every call."""

    def __init__(self, path, threads: int, total_len: int):
        import llama_cpp

        self.lib = llama_cpp
        _quiet(llama_cpp)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = False  # read the weights into memory now, not on first use
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.threads = threads
        self.total_len = total_len
        self.contexts = {}

    def params(self) -> int:
        return int(self.lib.llama_model_n_params(self.model))

    def _context(self, batch: int, prompt_len: int):
        if batch not in self.contexts:
            lib = self.lib
            params = lib.llama_context_default_params()
            params.n_ctx = batch * self.total_len
            params.n_seq_max = batch
            params.n_batch = params.n_ubatch = max(batch * prompt_len, batch)
            params.n_threads = params.n_threads_batch = self.threads
            params.kv_unified = False  # each row attends to its own cells only
            params.no_perf = True
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for batch {batch}")
            tokens = lib.llama_batch_init(params.n_batch, 0, batch)
            self.contexts[batch] = (ctx, tokens)
        return self.contexts[batch]

    def _step(self, ctx, tokens, rows):
        """Decodes `rows`: (token, position, sequence, wants logits) each; the argmax of each
        row that asked for logits, in order."""
        import numpy as np

        for i, (token, pos, seq, out) in enumerate(rows):
            tokens.token[i] = int(token)
            tokens.pos[i] = pos
            tokens.n_seq_id[i] = 1
            tokens.seq_id[i][0] = seq
            tokens.logits[i] = out
        tokens.n_tokens = len(rows)
        code = self.lib.llama_decode(ctx, tokens)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        picks = []
        for i, row in enumerate(rows):
            if row[3]:
                logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, i),
                                               shape=(self.vocab,))
                picks.append(int(logits.argmax()))
        return picks

    def generate(self, ids, new_tokens: int):
        """Greedy continuation [batch, new_tokens] of the prompts `ids` [batch, len]: one
        prefill of all rows (its logits give the first token), then new_tokens - 1 steps."""
        import numpy as np

        batch, prompt_len = ids.shape
        ctx, tokens = self._context(batch, prompt_len)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx), True)
        last = self._step(ctx, tokens, [(ids[r, p], p, r, p == prompt_len - 1)
                                        for r in range(batch) for p in range(prompt_len)])
        out = [last]
        for step in range(new_tokens - 1):
            last = self._step(ctx, tokens, [(last[r], prompt_len + step, r, True)
                                            for r in range(batch)])
            out.append(last)
        return np.asarray(out, dtype=np.int64).T
