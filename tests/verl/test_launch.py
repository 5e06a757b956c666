"""ENGINE=verl's command builder without verl: the cluster knobs, their defaults and errors, and Hydra values."""

from __future__ import annotations

import pytest

from opd.engines.verl.launch import LaunchError, _v, machine_from_env


def test_cluster_knobs_default_to_every_visible_gpu_minus_the_teachers():
    m = machine_from_env({}, with_teacher=True, cuda_devices=8)
    assert (m.nnodes, m.n_gpus_per_node, m.teacher_n_gpus, m.rollout, m.cpu) == (1, 7, 1, "vllm", False)
    m = machine_from_env(
        {"TEACHER_N_GPUS": "2", "NNODES": "2", "ROLLOUT_BACKEND": "sglang"}, with_teacher=True, cuda_devices=8
    )
    assert (m.nnodes, m.n_gpus_per_node, m.teacher_n_gpus, m.rollout) == (2, 6, 2, "sglang")
    grpo = machine_from_env({}, with_teacher=False, cuda_devices=8)
    assert (grpo.n_gpus_per_node, grpo.teacher_n_gpus) == (8, 0)
    cpu = machine_from_env({}, with_teacher=True, cuda_devices=0)
    assert (cpu.cpu, cpu.rollout, cpu.n_gpus_per_node, cpu.teacher_n_gpus) == (True, "opd_hf", 1, 1)


@pytest.mark.parametrize(
    "env, cuda, message",
    [
        ({"NNODES": "two"}, 8, "NNODES='two' is not valid; expected an integer >= 1"),
        ({"N_GPUS_PER_NODE": "0"}, 8, "N_GPUS_PER_NODE='0' is not valid"),
        ({"ROLLOUT_BACKEND": "trt"}, 8, "ROLLOUT_BACKEND='trt' is not valid; expected vllm | sglang | opd_hf"),
        ({"ROLLOUT_BACKEND": "vllm"}, 0, "ROLLOUT_BACKEND=vllm needs CUDA GPUs and none is visible"),
    ],
)
def test_bad_cluster_knobs_are_named(env, cuda, message):
    with pytest.raises(LaunchError, match=message):
        machine_from_env(env, with_teacher=True, cuda_devices=cuda)


def test_hydra_values():
    assert _v([0.9, 0.999]) == "[0.9,0.999]" and _v(True) == "true" and _v(None) == "null"
    assert _v("/data/a-b_c.parquet") == "/data/a-b_c.parquet"
    assert _v("my run, v2") == "'my run, v2'"  # Hydra syntax characters are quoted
