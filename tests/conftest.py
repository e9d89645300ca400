import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """Session-wide tiny checkpoints, each written once."""
    from encoder_probe import toy

    root = tmp_path_factory.mktemp("toy")
    made = {}

    def get(name, write):
        if name not in made:
            made[name] = write(root / name)
        return made[name]

    return get
