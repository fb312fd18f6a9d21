"""Hardware strategies: accelerate configs, refusals, SLURM launch, and equal losses across process layouts.

Proofs on a CPU (gloo): 2-process DDP of ``recipes/sft.py`` logs the losses of 1 process with the same global batch
and of gradient accumulation; FSDP2 (``fully_shard`` of the family's fsdp_blocks) logs the losses of DDP. accelerate
runs FSDP on GPUs only, so the FSDP proof drives ``fully_shard`` directly, started by torchrun: this file is also the
worker script (``python -m torch.distributed.run ... tests/test_distributed.py <worker> <out>``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml
from cli import DEMOS, ROOT, accelerate_launch, load_script, run

from vla_recipes.families import get_family, package_families

CONFIGS = ROOT / "accelerate_configs"
LOSS_ATOL = 1e-5


# ---------------------------------------------------------------- accelerate configs


def launch_env(config: Path) -> tuple[SimpleNamespace, dict[str, str]]:
    """The environment ``accelerate launch --config_file <config>`` gives the training script, through accelerate's
    own parsing and launcher functions, plus the WORLD_SIZE torchrun sets when the launcher starts it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(config), "recipes/sft.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:  # one process, no torchrun
        _, env = prepare_simple_launcher_cmd_env(args)
        return args, env
    return args, {**env, "WORLD_SIZE": str(int(args.nproc_per_node) * int(getattr(args, "nnodes", None) or 1))}


EXPECTED = {
    "single_gpu.yaml": {"kind": "single", "num_processes": 1},
    "multi_cpu.yaml": {"kind": "ddp", "num_processes": 2},
    "multi_gpu.yaml": {"kind": "ddp", "num_processes": 8},
    "multi_node.yaml": {"kind": "ddp", "num_processes": 16},
    "fsdp.yaml": {"kind": "fsdp", "num_processes": 8},
    "fsdp_qlora.yaml": {"kind": "fsdp", "num_processes": 2},
    "deepspeed_zero2.yaml": {"kind": "deepspeed", "zero_stage": 2, "num_processes": 8},
    "deepspeed_zero3.yaml": {"kind": "deepspeed", "zero_stage": 3, "zero3_save_16bit_model": True, "num_processes": 8},
}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_reshard_after_forward": True,
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_activation_checkpointing": False,
    "fsdp_blocks": (),
}


def test_every_config_is_tested():
    assert sorted(EXPECTED) == sorted(path.name for path in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_into_its_strategy(name):
    from vla_recipes.distributed import strategy_from_env

    args, env = launch_env(CONFIGS / name)
    strategy = strategy_from_env(env)
    expected = EXPECTED[name] | (FSDP2 if name.startswith("fsdp") else {})
    assert {key: getattr(strategy, key) for key in expected} == expected
    assert strategy.mixed_precision == "no"  # the recipe's bf16 / fp16 decide
    assert strategy.shards_weights == (name.startswith("fsdp") or name == "deepspeed_zero3.yaml")
    if name == "multi_node.yaml":
        assert (args.num_machines, args.machine_rank, args.main_process_port) == (2, 0, 29500)
        assert args.main_process_ip  # a placeholder launch.slurm replaces


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp_qlora.yaml"])
def test_fsdp_configs_build_accelerates_fsdp2_plugin(name):
    """The plugin accelerate builds from that environment: FSDP2, full shard, transformer-block wrapping with no
    class named (recipes/sft.py fills in the family's fsdp_blocks), sharded checkpoints, CPU-RAM-efficient loading."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    _, env = launch_env(CONFIGS / name)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # no CPU offload


# ---------------------------------------------------------------- FSDP blocks


def tiny_model(family: str, seed: int = 0):
    """The demo recipe's tiny model, randomly initialised from ``seed`` (pi0.5 with 2 cameras, 7-dim actions)."""
    import torch
    from transformers import AutoConfig

    import vla_recipes  # noqa: F401  (registers the model types)
    from vla_recipes.families import get_family

    config = AutoConfig.for_model(**DEMOS[family]["model_config"])
    if family == "pi05":
        config.camera_keys, config.action_dim, config.action_horizon = ["a", "b"], 7, 10
    torch.manual_seed(seed)
    return get_family(config.model_type).model_class(config)


@pytest.mark.parametrize("family", sorted(package_families()))
def test_fsdp_blocks_become_fsdp2_units(family):
    """use_fsdp_blocks gives accelerate's FSDP2 wrapping policy the family's blocks, which exist in the model;
    accelerate's fallback (the model's _no_split_modules) would take pi0.5's Gemma layers."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from vla_recipes.distributed import use_fsdp_blocks

    model = tiny_model(family)
    _, env = launch_env(CONFIGS / "fsdp.yaml")
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    default = fsdp2_prepare_auto_wrap_policy(plugin, model)
    default_units = {type(m).__name__ for m in model.modules() if default(m)}

    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    use_fsdp_blocks(trainer, model)
    blocks = get_family(family).fsdp_blocks
    assert plugin.transformer_cls_names_to_wrap == list(blocks)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # raises if a named class is not in the model
    units = [type(m).__name__ for m in model.modules() if policy(m)]
    assert set(units) == set(blocks)
    if "LlamaDecoderLayer" in blocks:  # OpenVLA and OpenVLA-OFT
        assert units.count("LlamaDecoderLayer") == 2 and units.count("Block") == 4
        assert default_units == set(units)  # transformers 5 adds the Llama model's own _no_split_modules
    else:
        assert units.count("SiglipEncoderLayer") == 2
        assert "GemmaDecoderLayer" in default_units

    plugin.transformer_cls_names_to_wrap = ["LlamaDecoderLayer"]  # a config that names its own blocks keeps them
    use_fsdp_blocks(trainer, model)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


# ---------------------------------------------------------------- refusals


def model_args(**fields):
    from vla_recipes.configs import ModelArguments

    return ModelArguments(model_config={"model_type": "openvla"}, **fields)


FSDP = {"kind": "fsdp", "num_processes": 2, "fsdp_version": 2}
ZERO3 = {"kind": "deepspeed", "num_processes": 2, "zero_stage": 3}
ZERO2 = {"kind": "deepspeed", "num_processes": 2, "zero_stage": 2}
DDP = {"kind": "ddp", "num_processes": 2}
QLORA = {"finetune_mode": "qlora"}
QLORA_BF16 = {"finetune_mode": "qlora", "dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"}


@pytest.mark.parametrize(
    ("strategy", "fields", "gradient_checkpointing", "message"),
    [
        (FSDP, QLORA, False, "finetune_mode='qlora' under FSDP shards the 4-bit base"),
        (ZERO3, QLORA, False, "finetune_mode='qlora' under DeepSpeed ZeRO-3 shards the 4-bit base"),
        (FSDP, {**QLORA_BF16, "dtype": "float32"}, False, "bnb_4bit_quant_storage='bfloat16'"),
        (FSDP, {"finetune_mode": "lora", "merge_adapters": True}, False, "merge_adapters under FSDP"),
        (ZERO3, {"finetune_mode": "lora", "merge_adapters": True}, False, "merge_adapters under DeepSpeed ZeRO-3"),
        ({**FSDP, "fsdp_blocks": ("GemmaDecoderLayer",)}, {}, False, "names ['GemmaDecoderLayer']"),
        ({**FSDP, "fsdp_activation_checkpointing": True}, {}, True, "keep one: --gradient_checkpointing false"),
    ],
)
def test_impossible_combination_is_refused(strategy, fields, gradient_checkpointing, message):
    from vla_recipes.configs import RecipeError
    from vla_recipes.distributed import Strategy, check_strategy

    with pytest.raises(RecipeError) as error:
        check_strategy(
            model_args(**fields), SimpleNamespace(gradient_checkpointing=gradient_checkpointing), Strategy(**strategy)
        )
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("strategy", "fields", "gradient_checkpointing"),
    [
        (FSDP, QLORA_BF16, False),  # FSDP + QLoRA with the quant storage in the compute dtype
        (ZERO3, QLORA_BF16, False),
        (ZERO2, QLORA, False),  # ZeRO-2 keeps whole weights on each process
        (DDP, {**QLORA, "merge_adapters": True}, True),
        (FSDP, {"finetune_mode": "lora"}, False),  # FSDP2 needs no use_orig_params for PEFT
        (FSDP, {"finetune_mode": "full"}, True),  # the recipe's checkpointing alone
        ({**FSDP, "fsdp_activation_checkpointing": True}, {}, False),  # FSDP's alone
    ],
)
def test_possible_combination_passes(strategy, fields, gradient_checkpointing):
    from vla_recipes.distributed import Strategy, check_strategy

    check_strategy(
        model_args(**fields), SimpleNamespace(gradient_checkpointing=gradient_checkpointing), Strategy(**strategy)
    )


def test_sft_refuses_before_loading_the_model(tmp_path, dataset_root, monkeypatch):
    """recipes/sft.py in the environment ``accelerate launch --config_file fsdp.yaml`` gives it: refused before the
    dataset is read or the base model written."""
    from vla_recipes.configs import RecipeError

    sft = load_script("sft")
    recipe = write_recipe(tmp_path, dataset_root, "openvla", finetune_mode="qlora")
    _, env = launch_env(CONFIGS / "fsdp.yaml")
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr("vla_recipes.data.run_data.load_metadata", lambda *_: pytest.fail("the dataset was read early"))
    with pytest.raises(RecipeError, match="finetune_mode='qlora' under FSDP shards the 4-bit base"):
        sft.main(["--config", str(recipe)])
    assert not (tmp_path / "recipe" / "base_model").exists()  # where a qlora run writes its random base first


# ---------------------------------------------------------------- SLURM


def test_launch_slurm_starts_accelerate_on_every_node(tmp_path):
    """recipes/launch.slurm under stand-in srun / scontrol / accelerate: one `accelerate launch` per node with its
    rank, the first node as main process, the process count of the allocation, the recipe and its overrides."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    stand_ins = {
        # srun: run the command once per node (its options dropped), as task SLURM_PROCID
        "srun": "n=1; while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && n=${1#--nodes=}; shift; done\n"
        'for ((r = 0; r < n; r++)); do SLURM_PROCID=$r "$@" || exit 1; done',
        "scontrol": '[[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] && printf "gpu-07\\ngpu-08\\n"',
        "nvidia-smi": 'for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100"; done',
        "accelerate": f'echo "$*" >> {calls}',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[07-08]"}
    env["SLURM_SUBMIT_DIR"] = str(ROOT)
    args = ["recipes/demo/openvla.yaml", "accelerate_configs/fsdp.yaml", "--learning_rate", "2e-4"]
    result = run(["bash", str(ROOT / "recipes/launch.slurm"), *args], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    common = (
        "--config_file accelerate_configs/fsdp.yaml --num_machines 2 --num_processes 16 --machine_rank {rank} "
        "--main_process_ip gpu-07 --main_process_port 29500 "
        "recipes/sft.py --config recipes/demo/openvla.yaml --learning_rate 2e-4"
    )
    assert lines == ["launch " + common.format(rank=0), "launch " + common.format(rank=1)]

    calls.unlink()  # default config: multi_node.yaml
    result = run(["bash", str(ROOT / "recipes/launch.slurm"), "recipes/demo/openvla.yaml"], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert all("--config_file accelerate_configs/multi_node.yaml" in line for line in calls.read_text().splitlines())


# ---------------------------------------------------------------- recipes/sft.py: DDP = 1 process = accumulation


def write_recipe(tmp_path: Path, dataset_root: str, demo: str, name: str = "recipe", **overrides) -> Path:
    """The demo recipe on the test dataset, 3 steps, a loss and gradient norm logged at each."""
    recipe = {
        **DEMOS[demo],
        "dataset_root": dataset_root,
        "train_episodes": None,
        "eval_episodes": None,
        "eval_strategy": "no",
        "output_dir": str(tmp_path / name),
        "max_steps": 3,
        "logging_steps": 1,
        "warmup_steps": 0,
        "dataloader_num_workers": 0,
        **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# What the Trainer logs itself; every other key of a training log is a family's metric (action_accuracy, ...).
TRAINER_KEYS = ("loss", "grad_norm", "learning_rate", "epoch", "step", "samples_per_second", "gpu_mem_peak_gb")


def train_log(tmp_path: Path, dataset_root: str, demo: str, name: str, config: str, **overrides) -> dict[str, list]:
    """The logged loss, gradient norm and family metrics of each step; ``"stderr"``: the run's log, every rank."""
    recipe = write_recipe(tmp_path, dataset_root, demo, name, **overrides)
    result = accelerate_launch(
        "recipes/sft.py", "--config", str(recipe), config=config, env={"ACCELERATE_USE_CPU": "1"}, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    metrics = sorted({key for entry in steps for key in entry if key not in TRAINER_KEYS})
    return {key: [entry[key] for entry in steps] for key in ("loss", "grad_norm", *metrics)} | {"stderr": result.stderr}


def assert_same_training(reference: dict, other: dict) -> None:
    import torch

    assert len(reference["loss"]) == 3
    torch.testing.assert_close(other["loss"], reference["loss"], atol=LOSS_ATOL, rtol=0)
    torch.testing.assert_close(other["grad_norm"], reference["grad_norm"], atol=1e-4, rtol=1e-5)


def assert_same_metrics(reference: dict, other: dict) -> None:
    """Same family metrics: true where each micro-batch's value is a mean over equally many elements (OpenVLA's
    action tokens), so that the mean over micro-batches and processes is the mean over the whole batch."""
    import torch

    metrics = sorted(set(reference) - {"loss", "grad_norm", "stderr"})
    assert metrics and metrics == sorted(set(other) - {"loss", "grad_norm", "stderr"})
    for name in metrics:
        torch.testing.assert_close(other[name], reference[name], atol=1e-5, rtol=1e-5, msg=name)


def check_layouts(tmp_path, root: str, demo: str, **overrides) -> tuple[dict, dict, dict]:
    """2 processes x batch 4 (DDP, gloo) and 1 process x batch 4 x accumulation 2 train as 1 process x batch 8."""
    single = train_log(tmp_path, root, demo, "single", "single_gpu.yaml", per_device_train_batch_size=8, **overrides)
    ddp = train_log(tmp_path, root, demo, "ddp", "multi_cpu.yaml", per_device_train_batch_size=4, **overrides)
    accumulated = train_log(
        tmp_path, root, demo, "accum", "single_gpu.yaml", per_device_train_batch_size=4, gradient_accumulation_steps=2,
        **overrides,
    )  # fmt: skip
    assert_same_training(single, ddp)
    assert_same_training(single, accumulated)
    return single, ddp, accumulated


def test_flow_matching_draws_depend_on_the_sample_only():
    """Each sample's noise and time come from its own seed: the same whatever the batch split, and the global RNG
    is left as it was (so nothing else shifts)."""
    import torch

    from vla_recipes.data.lerobot import sample_seed
    from vla_recipes.models.pi05.flow_matching import seeded_noise_and_time

    config = tiny_model("pi05").config

    def noise_and_time(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        draws = seeded_noise_and_time(config, seeds)
        return draws["noise"], draws["time"]

    seeds = [sample_seed(0, 0, index, stream=1) for index in range(8)]
    state = torch.random.get_rng_state()
    noise, time = noise_and_time(seeds)
    assert torch.equal(torch.random.get_rng_state(), state)
    (noise_a, time_a), (noise_b, time_b) = noise_and_time(seeds[:4]), noise_and_time(seeds[4:])
    assert torch.equal(noise, torch.cat([noise_a, noise_b])) and torch.equal(time, torch.cat([time_a, time_b]))
    assert noise.shape == (8, config.action_horizon, config.max_action_dim) and len(set(time.tolist())) == 8
    assert config.time_offset <= time.min() and time.max() <= config.time_offset + config.time_scale
    next_epoch, _ = noise_and_time([sample_seed(0, 1, index, stream=1) for index in range(8)])
    assert not torch.equal(next_epoch, noise)


def test_openvla_ddp_and_accumulation_equal_one_big_batch(tmp_path, dataset_root):
    """Also (issue 14) the family metrics, summed on the device and reduced once per log, equal one process's; the
    dataset checks and statistics run on the main process alone (rank 1 neither computes them nor reads the cache:
    one "norm stats" line), one process builds each frame-cache entry, and only the main process logs at INFO."""
    single, ddp, accumulated = check_layouts(tmp_path, dataset_root, "openvla")
    assert_same_metrics(single, ddp)
    assert_same_metrics(single, accumulated)
    assert len(re.findall(r"norm stats: (computed|reused)", ddp["stderr"])) == 1, ddp["stderr"][-3000:]
    # INFO lines come from the main process alone (the run's summary line once, not once per rank)
    assert len(re.findall(r"INFO vla_recipes\.pipeline: training openvla", ddp["stderr"])) == 1, ddp["stderr"][-3000:]
    assert ddp["stderr"].count("frame cache: wrote") <= 1


def test_a_dataset_error_on_the_main_process_stops_every_rank_in_one_line(tmp_path, dataset_root):
    """The dataset checks run on the main process alone (issue 14): its one-line error reaches every rank, none
    waits for it (a hang would fail this test at the timeout)."""
    recipe = write_recipe(tmp_path, dataset_root, "openvla", "bad", train_episodes=["0:999"])
    result = accelerate_launch("recipes/sft.py", "--config", str(recipe), config="multi_cpu.yaml", timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]
    assert errors[0].startswith("error: train_episodes: episodes [") and "do not exist" in errors[0]


@pytest.mark.slow
def test_pi05_ddp_and_accumulation_equal_one_big_batch(tmp_path, two_camera_root):
    """Needs per-sample flow-matching noise and time (the collator's seeded_draws); holds with checkpointing on."""
    check_layouts(tmp_path, two_camera_root, "pi05", gradient_checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize("demo", ["openvla", "pi05"])
def test_bf16_switch_trains_in_bf16(tmp_path, dataset_root, two_camera_root, demo):
    """The recipe's ``bf16: true`` runs the forward in bf16 autocast: the losses move off the float32 ones by
    bf16 rounding, and no further."""
    import torch

    root = dataset_root if demo == "openvla" else two_camera_root
    cpu = {"per_device_train_batch_size": 4, "use_cpu": True}  # transformers wants use_cpu for bf16 on a CPU
    fp32 = train_log(tmp_path, root, demo, "fp32", "single_gpu.yaml", **cpu)
    bf16 = train_log(tmp_path, root, demo, "bf16", "single_gpu.yaml", **cpu, bf16=True)
    # float32 runs of other layouts agree to < 1e-6; bf16 rounding moves the losses by far more
    assert max(abs(a - b) for a, b in zip(fp32["loss"], bf16["loss"], strict=True)) > 2e-5, (fp32, bf16)
    torch.testing.assert_close(bf16["loss"], fp32["loss"], rtol=0.05, atol=0)


# ---------------------------------------------------------------- FSDP2 (fully_shard over gloo) = DDP


@pytest.mark.slow
def test_fsdp2_of_fsdp_blocks_matches_ddp(tmp_path):
    """openvla full, pi05 full and pi05 expert_only: 2 ranks, AdamW, 3 steps, same init and data. Making pi0.5's
    Gemma layers units of their own fails, which is why pi0.5's fsdp_blocks leave them out."""
    out = tmp_path / "fsdp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run([*command, __file__, "fsdp", str(out)], timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "mixed torch.Tensor and DTensor" in results.pop("pi05 with GemmaDecoderLayer units")
    assert sorted(results) == ["openvla/full", "pi05/expert_only", "pi05/full"]
    for case, (ddp, fsdp) in results.items():
        assert ddp["loss"][-1] < ddp["loss"][0], case  # it trains
        assert_same_training(ddp, fsdp)


def fsdp_worker(out: str) -> None:
    """Each case trains the same tiny model under DDP and under fully_shard (the family's fsdp_blocks, then the
    root)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from vla_recipes.families import get_family

    dist.init_process_group("gloo")
    rank, mesh = dist.get_rank(), init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for family, mode in (("openvla", "full"), ("pi05", "full"), ("pi05", "expert_only")):
        max_action_dim = tiny_model(family).config.max_action_dim if family == "pi05" else 0
        batches = [fake_batch(family, rank, max_action_dim)] * 3  # one batch per rank, learned step by step
        runs = []
        for wrap in ("ddp", "fsdp"):
            model = tiny_model(family)
            if mode == "expert_only":
                model.freeze_vlm()
            if wrap == "ddp":
                wrapped = DistributedDataParallel(model)
            else:
                for module in list(model.modules()):
                    if type(module).__name__ in get_family(family).fsdp_blocks:
                        fully_shard(module, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            params = [p for p in wrapped.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3)
            log = {"loss": [], "grad_norm": []}
            for batch in batches:
                loss = wrapped(**batch).loss
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                optimizer.step()
                optimizer.zero_grad()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                log["loss"].append(mean.item() / dist.get_world_size())
                log["grad_norm"].append(norm.item())
            runs.append(log)
        results[f"{family}/{mode}"] = runs
    # Why pi0.5's Gemma layers are not FSDP units: the joint attention reads their (sharded) weights directly.
    model = tiny_model("pi05")
    for module in list(model.modules()):
        if type(module).__name__ in ("SiglipEncoderLayer", "GemmaDecoderLayer"):
            fully_shard(module, mesh=mesh)
    try:
        fully_shard(model, mesh=mesh)(**fake_batch("pi05", rank, model.config.max_action_dim)).loss.backward()
        results["pi05 with GemmaDecoderLayer units"] = "trained"
    except Exception as error:  # the message is the result
        results["pi05 with GemmaDecoderLayer units"] = f"{type(error).__name__}: {error}"
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    # DTensor's cache keeps the gloo group alive past destroy_process_group; interpreter exit can then abort.
    sys.stdout.flush()
    os._exit(0)


def fake_batch(family: str, rank: int, max_action_dim: int, size: int = 2) -> dict:
    """A random batch in the model's input layout, different per rank."""
    import torch

    generator = torch.Generator().manual_seed(rank)
    if family == "openvla":
        ids = torch.randint(2, 355, (size, 12), generator=generator)
        ids[:, 0] = 1
        labels = ids.clone()
        labels[:, :6] = -100
        pixels = torch.rand(size, 6, 112, 112, generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}
    return {
        "pixel_values": torch.rand(size, 2, 3, 112, 112, generator=generator) * 2 - 1,
        "image_masks": torch.ones(size, 2, dtype=torch.bool),
        "input_ids": torch.randint(0, 128, (size, 16), generator=generator),
        "attention_mask": torch.ones(size, 16, dtype=torch.bool),
        "actions": torch.randn(size, 10, 7, generator=generator),
        "action_is_pad": torch.zeros(size, 10, dtype=torch.bool),
        "noise": torch.randn(size, 10, max_action_dim, generator=generator),
        "time": torch.rand(size, generator=generator),
    }


# ---------------------------------------------------------------- end_training closes gloo


@pytest.mark.parametrize(("teardown", "threads"), [("end_training", 0), ("old", 2)])
def test_end_training_stops_gloo_threads(tmp_path, teardown, threads):
    """With a real Trainer in 2 gloo processes, end_training leaves no gloo worker thread running; the old
    teardown (wait_for_everyone + end_training) leaves them (and could hang or abort at exit)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run([*command, __file__, "teardown", str(tmp_path), teardown], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    counts = [json.loads((tmp_path / f"rank{rank}.json").read_text())["gloo_threads"] for rank in (0, 1)]
    assert counts == [threads, threads]


def gloo_threads() -> int:
    return sum(comm.read_text().strip() == "pt_gloo_runloop" for comm in Path("/proc/self/task").glob("*/comm"))


def teardown_worker(out: str, teardown: str) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from vla_recipes.distributed import end_training

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(16)]
    args = TrainingArguments(
        output_dir=out, max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to="none",
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=Regression(), args=args, train_dataset=data)
    trainer.train()
    if teardown == "end_training":
        end_training(trainer)
    else:
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    rank = trainer.args.process_index
    Path(out, f"rank{rank}.json").write_text(json.dumps({"gloo_threads": gloo_threads()}))
    sys.stdout.flush()
    os._exit(0)  # the old teardown can hang or abort at interpreter exit: the count is what is tested


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    worker, *worker_args = sys.argv[1:]
    {"fsdp": fsdp_worker, "teardown": teardown_worker}[worker](*worker_args)
