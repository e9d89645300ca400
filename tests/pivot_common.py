"""What the trainer tests share: 8 VQA preference records, a published-geometry Qwen2-VL, the parts of a
fresh MLLM, and a training script that kill -9s itself after a given step."""
import json

import numpy as np
import pytest
from PIL import Image

from encoder_probe import toy

QUESTIONS = ["What colour is the square?", "How many dots are in the image?", "Is the star large or small?",
             "What colour is the ring?"]
ANSWERS = [("red", "orange"), ("3", "4"), ("large", "small"), ("blue", "cyan")]

# argv: out, the step after which the process kills itself (0: never), then TrainConfig overrides as
# key=value Python literals (init, data, batch_size, ...)
KILL_SCRIPT = (
    "import ast, os, signal, sys\n"
    "from transformers import TrainerCallback\n"
    "from encoder_probe.pivot.train import TrainConfig, train\n"
    "class Kill(TrainerCallback):\n"
    "    def on_step_end(self, args, state, control, **kw):\n"
    "        if state.global_step == int(sys.argv[2]): os.kill(os.getpid(), signal.SIGKILL)\n"
    "kw = {k: ast.literal_eval(v) for k, v in (a.split('=', 1) for a in sys.argv[3:])}\n"
    "train(TrainConfig(stage='dpo', out=sys.argv[1], lr=1e-3, warmup_ratio=0.0, device='cpu', progress=False, **kw),"
    " callbacks=[Kill()])\n")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 preference records over random 40x56 images, relative paths as MMPR ships them."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        chosen, rejected = ANSWERS[i % 4]
        lines.append(json.dumps({"image": f"images/{i}.png", "question": QUESTIONS[i % 4], "chosen": chosen,
                                 "rejected": rejected}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen2-VL at its published geometry (14 px patches, 2x2 merge), tiny widths, with its processor."""
    return toy.write_hf_mllm(tmp_path_factory.mktemp("qwen") / "qwen2_vl", "qwen2_vl", geometry="published",
                             processor=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A plain SigLIP tower dir and a Qwen2 LM dir with its chat tokenizer (what pretrain starts from)."""
    root = tmp_path_factory.mktemp("parts")
    return toy.write_siglip_dir(root / "tower", image_size=64, patch_size=8), toy.write_lm_dir(root / "lm")
