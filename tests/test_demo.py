"""The bundled demo preset and the script that trains it."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import gemma_keras as gk

# A document the preset was trained on (posixpath.join's docstring, the same in every Python
# the project supports, as the training script writes it), and prose it has never seen.
SEEN = ("posixpath.join(a, *p)\n\nJoin two or more pathname components, inserting '/' as "
        "needed.\nIf any component is an absolute path, all previous path components\nwill be "
        "discarded.  An empty last part will result in a path that\nends with a separator.")
UNSEEN = ("The committee met on Tuesday to discuss the harvest festival, and everyone agreed "
          "that the pumpkins were larger than last year.")


def _mean_loss(lm, text):
    ids = np.asarray([lm.tokenizer.tokenize(text, add_bos=True)], "int32")
    logits = keras.ops.convert_to_numpy(keras.ops.cast(
        lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), "float32"))[0, :-1]
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(log_probs)), ids[0, 1:]].mean())


def test_demo_preset_learned_its_corpus():
    # A random model of this vocabulary scores ~ln(4096) = 8.3 nats per token everywhere
    # (measured: 8.34 on SEEN); the preset as trained scores 3.48 on its own docstring and
    # 7.25 on unrelated prose. It must know its corpus far better than chance, and better
    # than text of another kind.
    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    assert lm.instruct is True and lm.tokenizer is not None
    seen, unseen = _mean_loss(lm, SEEN), _mean_loss(lm, UNSEEN)
    assert seen < 0.5 * np.log(lm.config.vocabulary_size), seen
    assert seen + 2.0 < unseen, (seen, unseen)


def test_demo_preset_generates_and_chats():
    lm = gk.GemmaCausalLM.from_preset("gemma_demo")
    text = lm.generate("Module json\n\n", max_new_tokens=24)
    assert text.startswith("Module json\n\n") and len(text.split()) >= 6
    words = text.split()[2:]
    assert sum(w.strip(".,()`'\":;").isalpha() for w in words) >= len(words) // 2, text
    chat = lm.chat()
    reply = chat.send("What does os.path.join do?", max_new_tokens=60)
    # The reply ends on <end_of_turn> (the demo was trained on chat turns) well before 60.
    assert reply.strip() and chat.last_reply_ids[-1] == lm.tokenizer.end_of_turn_id, reply
    assert chat.send("What is the json module?", max_new_tokens=60).strip()


# A subprocess; training itself is tested on every backend. In the torch pass, the least
# loaded (the script trains as fast on torch as on TensorFlow on a CPU).
@pytest.mark.once("torch")
def test_training_script_reruns_on_a_small_budget(repo_root, tmp_path):
    output = tmp_path / "demo"
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "scripts/train_demo_preset.py", "--steps", "12", "--max-docs", "300",
         "--vocabulary-size", "600", "--batch-size", "8", "--output", str(output)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((output / "training.json").read_text())
    losses = [loss for _, loss in record["losses"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert (output / "loss_curve.svg").read_text().startswith("<svg")
    lm = gk.GemmaCausalLM.from_preset(str(output))
    assert lm.config.vocabulary_size == 600
    assert lm.generate("Module os", max_new_tokens=4).startswith("Module os")
