"""Shared fixtures: a SentencePiece model trained at test time, and tiny random Gemma
checkpoints written by the reference libraries themselves (HF transformers, keras-hub)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The test models are tiny: in the JAX and TensorFlow passes XLA's compile time is most of
# the time, their run time next to nothing. So (before either imports XLA; child processes
# inherit both): LLVM's optimisation level 0, which changes no result (XLA's CPU math is
# not fast-math at any level) and only how fast the code runs; and a JAX compilation cache
# shared by the pass, so the same step compiled for another model of the same shapes is read
# back. test_generation + test_quantization on JAX, 2 idle cores: 82 s -> 60 s (level 0)
# -> 52 s (and the cache). Benchmarks and users keep XLA's defaults.
if os.environ["KERAS_BACKEND"] in ("jax", "tensorflow"):
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
if os.environ["KERAS_BACKEND"] == "jax" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemma_keras_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = os.environ["KERAS_BACKEND"]
# `scripts/test.sh --all` sets this: every test on every backend (before a release).
RUN_ALL = os.environ.get("GEMMA_KERAS_TEST_ALL") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "once(backend): an end-to-end test (a guide, a script, a CLI subprocess, a fresh "
        "install) whose code path does not depend on the backend, or that one backend covers: "
        "it runs in one backend's pass only, unless GEMMA_KERAS_TEST_ALL=1.")


def pytest_unconfigure(config):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if os.path.basename(cache).startswith("gemma_keras_xla_"):  # the one made above
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Deselects `once` tests that belong to another backend's pass."""
    if RUN_ALL:
        return
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("once")
        (drop if marker is not None and marker.args[0] != BACKEND else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


SEQ = 16
# Gemma 3's RoPE as transformers 5 writes it (4.x: rope_theta, rope_local_base_freq,
# rope_scaling): linear x8 on the global layers, as the 4B-27B checkpoints.
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
# Tiny architectures covering every attention layout and Gemma 2 feature. Values are HF
# config kwargs; keras-hub equivalents are derived in `keras_hub_kwargs`.
HF_CASES = {
    "gemma_mqa": dict(model_type="gemma", num_attention_heads=4, num_key_value_heads=1,
                      head_dim=16),
    "gemma_mha": dict(model_type="gemma", num_attention_heads=4, num_key_value_heads=4,
                      head_dim=16),
    # Window 5 < SEQ, and soft-caps small enough that tanh is far from linear here.
    "gemma2_gqa": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                       attn_logit_softcapping=4.0, final_logit_softcapping=6.0),
    # Gemma 2 27B's query scale: (hidden / heads) ** -0.5 = 1/4 here, head_dim ** -0.5 = 1/sqrt(32).
    "gemma2_27b_style": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, query_pre_attn_scalar=16, sliding_window=5,
                             attn_logit_softcapping=4.0, final_logit_softcapping=6.0),
    # VaultGemma: Gemma 2 without its post-norms.
    "vaultgemma": dict(model_type="vaultgemma", num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                       attn_logit_softcapping=4.0, final_logit_softcapping=6.0),
    # Gemma 3: QK-norm, five local layers to one global (6 layers), RoPE 10k local / 1M
    # global with x8 linear scaling on the global layer, window 5 < SEQ, and a query scale
    # that is neither head_dim nor hidden / heads (24 against 16), which only transformers
    # computes (keras-hub cannot express it).
    "gemma3": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, query_pre_attn_scalar=24, sliding_window=5, num_hidden_layers=6,
                   rope_parameters=GEMMA3_ROPE),
    # The text part of a multimodal Gemma 3 (Gemma3ForConditionalGeneration, as 4B-27B):
    # its weights under model.language_model.*, a tiny SigLIP tower beside them. Query scale
    # head_dim ** -0.5, so keras-hub's Gemma3Backbone computes it too.
    "gemma3_mm": dict(model_type="gemma3", num_attention_heads=4, num_key_value_heads=1,
                      head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                      num_hidden_layers=6, rope_parameters=GEMMA3_ROPE),
}
HIDDEN, LAYERS, INTERMEDIATE = 64, 3, 96
# Cases whose reference is transformers alone: keras-hub 0.32 cannot express their query
# scale (it uses head_dim whatever the config says; gemma3's 24 is not even hidden / heads).
HF_ONLY_CASES = ("gemma2_27b_style", "vaultgemma", "gemma3")


def _train_spm(directory, special_pieces):
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    lines = [f"The quick brown fox {i} jumps over the lazy dog number {i * 7}." for i in range(300)]
    lines += ["Keras is a deep learning API written in Python.",
              "Gemma models are lightweight open models from Google."] * 50
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tok"), vocab_size=400,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=special_pieces, byte_fallback=True,
        split_digits=True, character_coverage=1.0, minloglevel=2,
        # As Gemma's own model: no dummy "▁" prefix, no normalisation, spaces kept.
        add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False)
    return directory / "tok.model"


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A Gemma-style SentencePiece model: <pad>=0 <eos>=1 <bos>=2 <unk>=3, turn markers as
    pieces, byte fallback, split digits."""
    return _train_spm(tmp_path_factory.mktemp("spm"), ["<start_of_turn>", "<end_of_turn>"])


# Gemma 3's vocabulary adds the image pieces (keras-hub's Gemma3Tokenizer looks up "<img>",
# "<start_of_image>" and "<end_of_image>"; transformers' processor "<image_soft_token>").
GEMMA3_PIECES = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                 "<img>", "<image_soft_token>"]


@pytest.fixture(scope="session")
def gemma3_spm_path(tmp_path_factory, spm_path):
    """spm_path's tokenizer as Gemma 3's: the same size (the tiny checkpoints share one
    vocabulary size), with Gemma 3's special pieces."""
    return _train_spm(tmp_path_factory.mktemp("spm3"), GEMMA3_PIECES)


@pytest.fixture(scope="session")
def vocab_size(spm_path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(spm_path)).GetPieceSize()


def token_batch(vocab_size, seed=0):
    """[2, SEQ] ids and a padding mask with the second row right-padded."""
    ids = np.random.RandomState(seed).randint(4, vocab_size, size=(2, SEQ)).astype("int32")
    mask = np.ones_like(ids)
    mask[1, SEQ - 5:] = 0
    ids[1, SEQ - 5:] = 0
    return ids, mask


def randomize_torch(model, seed=0, std=0.25):
    """HF initialises norm scales at zero and weights small: give every weight, norms
    included, a scale at which each feature (soft-caps, norms) visibly changes the logits."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if "norm" in name else std
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def hf_model(case, vocab_size, seed=0, std=0.25, embedding_std=None):
    """A random HF model. With embedding_std small against std, the layers (not the tied
    embedding) drive predictions, so greedy decoding wanders instead of repeating a token."""
    import torch
    import transformers

    kwargs = dict(HF_CASES[case])
    model_type = kwargs.pop("model_type")
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, hidden_activation="gelu_pytorch_tanh")
    common.update(kwargs)
    if model_type == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common))
    elif model_type == "gemma2":
        model = transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**common, attn_implementation="eager"))
    elif model_type == "vaultgemma":
        model = transformers.VaultGemmaForCausalLM(
            transformers.VaultGemmaConfig(**common, attn_implementation="eager"))
    elif model_type == "gemma3_text":
        model = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**common, attn_implementation="eager"))
    else:  # "gemma3": text model beside a tiny image tower (2 x 2 patches -> 4 soft tokens)
        vision = transformers.SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=28, patch_size=14)
        config = transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**common), vision_config=vision,
            mm_tokens_per_image=4, image_token_index=vocab_size - 1,
            boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
            attn_implementation="eager")
        model = transformers.Gemma3ForConditionalGeneration(config)
    randomize_torch(model, seed, std)
    if embedding_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(embedding_std / std)
    return model.eval().to(torch.float32)


def hf_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


class _Pristine:
    """Reference checkpoints built once per session, keyed by how they were made."""

    def __init__(self, root):
        self.root, self.entries = root, {}

    def get(self, key, build, name):
        """(directory, model): `build(directory) -> model` runs on the first request only.
        The directory is shared: read it, never write to it (see `_copy`)."""
        if key not in self.entries:
            directory = self.root / f"{len(self.entries)}_{name}"
            self.entries[key] = (directory, build(directory))
        return self.entries[key]


def _copy(source, tmp_path, name):
    """A test's own copy of a pristine checkpoint, which it may corrupt or overwrite."""
    import shutil

    target, n = tmp_path / name, 1
    while target.exists():  # the same test asked twice: a second copy
        target, n = tmp_path / f"{name}_{n}", n + 1
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def pristine_hf(tmp_path_factory, spm_path, gemma3_spm_path, vocab_size):
    """Factory: case -> (shared read-only directory, HF model), written once per session."""
    store = _Pristine(tmp_path_factory.mktemp("pristine_hf"))

    def get(case, seed=0, shard="40KB", **model_kwargs):
        import shutil

        def build(directory):
            model = hf_model(case, vocab_size, seed, **model_kwargs)
            model.save_pretrained(directory, max_shard_size=shard)
            gemma3 = HF_CASES[case]["model_type"].startswith("gemma3")
            shutil.copy(gemma3_spm_path if gemma3 else spm_path, directory / "tokenizer.model")
            return model
        key = (case, seed, shard, tuple(sorted(model_kwargs.items())))
        return store.get(key, build, f"hf_{case}")
    return get


@pytest.fixture
def hf_checkpoint(tmp_path, pristine_hf):
    """Factory: case name -> (directory, HF model). Saved sharded, with tokenizer.model; the
    directory is this test's own copy."""
    def make(case, seed=0, shard="40KB", **model_kwargs):
        source, model = pristine_hf(case, seed, shard, **model_kwargs)
        return _copy(source, tmp_path, f"hf_{case}"), model
    return make


def keras_hub_kwargs(case, vocab_size):
    """The case's keras-hub backbone arguments: GemmaBackbone's (which are also GemmaConfig's)
    for Gemma 1 and 2, Gemma3Backbone's (intermediate_dim one GeGLU branch) for Gemma 3."""
    hf = HF_CASES[case]
    kwargs = dict(vocabulary_size=vocab_size, num_layers=hf.get("num_hidden_layers", LAYERS),
                  num_query_heads=hf["num_attention_heads"],
                  num_key_value_heads=hf["num_key_value_heads"], hidden_dim=HIDDEN,
                  intermediate_dim=2 * INTERMEDIATE, head_dim=hf["head_dim"])
    if hf["model_type"].startswith("gemma3"):
        rope = hf["rope_parameters"]
        kwargs.update(
            intermediate_dim=INTERMEDIATE, image_size=28,
            query_head_dim_normalize=hf["query_pre_attn_scalar"] == hf["head_dim"],
            use_query_key_norm=True, use_post_ffw_norm=True, use_post_attention_norm=True,
            use_sliding_window_attention=True, sliding_window_size=hf["sliding_window"],
            global_rope_scaling_factor=rope["full_attention"].get("factor", 1.0),
            local_rope_scaling_factor=rope["sliding_attention"].get("factor", 1.0))
    elif hf["model_type"] == "gemma2":
        kwargs.update(
            query_head_dim_normalize=hf["query_pre_attn_scalar"] == hf["head_dim"],
            use_post_ffw_norm=True, use_post_attention_norm=True,
            attention_logit_soft_cap=hf["attn_logit_softcapping"],
            final_logit_soft_cap=hf["final_logit_softcapping"],
            use_sliding_window_attention=True, sliding_window_size=hf["sliding_window"])
    return kwargs


def keras_hub_lm(case, vocab_size, spm_path, seed=0, vision=False):
    """A random keras-hub CausalLM of the case (Gemma3CausalLM for Gemma 3, then `spm_path`
    should be gemma3_spm_path; with `vision`, beside a tiny Gemma3VisionEncoder: 28 x 28
    images in 2 x 2 patches, 4 soft tokens each)."""
    import keras_hub

    models = keras_hub.models
    kwargs = keras_hub_kwargs(case, vocab_size)
    gemma3 = HF_CASES[case]["model_type"].startswith("gemma3")
    if gemma3:
        encoder = None
        if vision:
            encoder = models.Gemma3VisionEncoder(
                image_size=28, patch_size=14, num_heads=2, hidden_dim=16, num_layers=1,
                intermediate_dim=32, output_dim=HIDDEN, pool_size=1)
        backbone = models.Gemma3Backbone(**kwargs, vision_encoder=encoder)
    else:
        assert not vision, "only Gemma 3 has a vision encoder"
        backbone = models.GemmaBackbone(**kwargs)
    rng = np.random.RandomState(seed)
    for variable in backbone.weights:
        std = 0.5 if "norm" in variable.path else 0.25
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    if not gemma3:
        tokenizer = models.GemmaTokenizer(proto=str(spm_path))
        preprocessor = models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=SEQ)
        return models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    tokenizer = models.Gemma3Tokenizer(proto=str(spm_path), has_vision_tokens=vision)
    converter = keras_hub.layers.Gemma3ImageConverter(image_size=(28, 28)) if vision else None
    preprocessor = models.Gemma3CausalLMPreprocessor(
        tokenizer, image_converter=converter, sequence_length=SEQ,
        num_vision_tokens_per_image=4 if vision else 256)
    return models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def keras_hub_logits(lm, ids, mask):
    import keras

    hidden = lm.backbone({"token_ids": ids, "padding_mask": mask})
    return keras.ops.convert_to_numpy(lm.backbone.token_embedding(hidden, reverse=True))


@pytest.fixture(scope="session")
def _pristine_keras_hub(tmp_path_factory, spm_path, gemma3_spm_path, vocab_size):
    store = _Pristine(tmp_path_factory.mktemp("pristine_keras_hub"))

    def get(case, seed=0, max_shard_size=None, vision=False):
        def build(directory):
            gemma3 = HF_CASES[case]["model_type"].startswith("gemma3")
            lm = keras_hub_lm(case, vocab_size, gemma3_spm_path if gemma3 else spm_path, seed,
                              vision)
            if max_shard_size is None:
                lm.save_to_preset(str(directory))
            else:
                lm.save_to_preset(str(directory), max_shard_size=max_shard_size)
            return lm
        key = (case, seed, max_shard_size, vision)
        return store.get(key, build, f"kh_{case}" + ("_vision" if vision else ""))
    return get


@pytest.fixture
def keras_hub_preset(tmp_path, _pristine_keras_hub):
    """Factory: case -> (directory, keras-hub CausalLM) saved with keras-hub's own saver;
    the directory is this test's own copy. vision=True: a Gemma 3 case with a vision encoder."""
    def make(case, seed=0, max_shard_size=None, vision=False):
        source, lm = _pristine_keras_hub(case, seed, max_shard_size, vision)
        return _copy(source, tmp_path, f"kh_{case}"), lm
    return make


def logits_of(lm, ids, mask):
    import keras

    return keras.ops.convert_to_numpy(lm({"token_ids": ids, "padding_mask": mask}))


def padded_logits(lm, tokens, width):
    """[len(tokens), vocab] logits of one full forward pass, run right-padded to `width`
    columns: causal attention keeps the padding from earlier positions, and a reference that
    grows token by token reuses one compilation instead of one per length."""
    ids = np.zeros((1, width), "int32")
    ids[0, : len(tokens)] = tokens
    mask = (np.arange(width) < len(tokens))[None].astype("int32")
    return logits_of(lm, ids, mask)[0, : len(tokens)]


def max_diff_on_real_tokens(a, b, mask):
    valid = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a, "float32") - np.asarray(b, "float32"))[valid].max())


@pytest.fixture
def repo_root():
    return pathlib.Path(__file__).resolve().parents[1]


def input_gradient(fn, x, upstream):
    """d sum(fn(x) * upstream) / dx on the current backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: (fn(v) * upstream).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            total = tf.reduce_sum(fn(v) * upstream)
        return tape.gradient(total, v).numpy()
    import torch

    v = torch.tensor(x, requires_grad=True)
    (fn(v) * torch.tensor(upstream)).sum().backward()
    return v.grad.numpy()


@pytest.fixture(scope="session")
def hflm_checkpoint(pristine_hf, spm_path):
    """Factory: case -> a shared, read-only HF checkpoint directory with the tokenizer files
    transformers' AutoTokenizer (and so lm-eval's HFLM) loads, and its HF model."""
    def get(case="gemma_mqa", seed=0, **model_kwargs):
        from gemma_keras.checkpoints.hf_writer import write_hf_tokenizer
        from gemma_keras.tokenizer import GemmaTokenizer

        directory, model = pristine_hf(case, seed, **model_kwargs)
        if not (directory / "tokenizer.json").is_file():
            write_hf_tokenizer(GemmaTokenizer(spm_path), directory)
        return directory, model
    return get


def one_line_error(result, *needles):
    """A command-line mistake: exit status 2 and one line on stderr holding each needle."""
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
