"""Class-conditional MNIST end to end, at a tiny size: EDM teacher, then DiffRatio from it, with labels
reaching the denoiser, the generator and the ratio network, and MNIST FD / class coverage evaluated."""
import json

from conftest import CONFIGS
from fastonestep.config import load_config
from fastonestep.engine.export import read_info
from fastonestep.engine.loop import train

TINY = ["data.size=128", "data.class_conditional=true", "network.channels=8", "network.channel_mult=[1,2]",
        "train.batch_size=16", "train.steps=3", "train.log_every=1", "eval.num_samples=20", "eval.batch_size=20",
        "diffusion.sample_steps=2"]


def test_class_conditional_teacher_and_diffratio(tmp_path, cache_dir):
    quiet = dict(progress=False, log=lambda *_: None)
    teacher = tmp_path / "teacher"
    train(load_config(str(CONFIGS / "mnist" / "teacher.yaml"), TINY), str(teacher), **quiet)
    assert read_info(str(teacher / "model.safetensors"))["num_classes"] == 10

    student = tmp_path / "student"
    metrics = train(load_config(str(CONFIGS / "mnist" / "diffratio.yaml"), TINY + [f"teacher={teacher}"]),
                    str(student), **quiet)
    assert {"one_step", "init_one_step", "teacher_heun2"} <= metrics.keys()
    assert metrics["teacher_heun2"]["measured_in"] == str(teacher)
    for name in ("one_step", "init_one_step"):
        assert metrics[name]["mnist_fd"] > 0 and 1 <= metrics[name]["num_classes_covered"] <= 10
    rows = [json.loads(line) for line in (student / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "ratio/accuracy" in rows[0]
