from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from kdsearch.data import ImageData, load_data
from kdsearch.errors import NonFiniteLoss, RecipeError
from kdsearch.models import TapModel, build_model
from kdsearch.train import (
    CompiledTaps,
    EpochStats,
    autocast_dtype,
    cpu_has_amx,
    cpu_multiplies_bf16,
    fixed,
    kernel_cap,
    lr_at,
    onednn_isa_cap,
    ready,
    recorded_cap,
    resolve_device,
    train,
    trained_precision,
)

from .conftest import Recorder, cpu_like, tiny_recipe


@pytest.fixture(scope="module")
def synthetic() -> ImageData:
    from kdsearch.recipe import DataConfig

    return load_data(DataConfig(dataset="synthetic", val_fraction=0.2))


def _teacher(data: ImageData, epochs: int = 3) -> TapModel:
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": epochs})
    return train(recipe, data).student


def test_student_alone_learns_and_reports_every_epoch(synthetic: ImageData) -> None:
    seen: list[EpochStats] = []
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 4})
    result = train(recipe, synthetic, seen.append)
    assert [s.epoch for s in seen] == [1, 2, 3, 4]
    assert seen[-1].val_acc > 0.5, "10 classes: chance is 0.1"
    assert seen[-1].train_loss < seen[0].train_loss
    assert all(s.images_per_sec > 0 and s.seconds > 0 for s in seen)
    assert set(seen[0].parts) == {"ce"}
    assert result.val_acc == seen[-1].val_acc and result.params > 0


def test_a_batch_report_follows_every_training_batch(synthetic: ImageData) -> None:
    recorder = Recorder()
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 2})
    train(recipe, synthetic, recorder)
    per_epoch = len(synthetic.train) // recipe.batch_size  # full batches only
    assert recorder.epochs == [1, 2]
    assert recorder.ticks == [(k, per_epoch) for k in range(1, per_epoch + 1)] * 2


def test_kd_run_reports_both_terms_and_their_weighted_sum(synthetic: ImageData) -> None:
    seen: list[EpochStats] = []
    teacher = _teacher(synthetic, epochs=1)
    train(tiny_recipe({"schedule.epochs": 1}), synthetic, seen.append, teacher=teacher)
    parts = seen[0].parts
    assert set(parts) == {"ce", "kd"}
    assert seen[0].train_loss == pytest.approx(1.0 * parts["ce"] + 0.9 * parts["kd"], rel=1e-4)


def test_same_seed_gives_the_same_run_on_cpu(synthetic: ImageData) -> None:
    teacher = _teacher(synthetic, epochs=1)
    runs = [train(tiny_recipe(), synthetic, teacher=teacher) for _ in range(2)]
    assert [s.val_acc for s in runs[0].history] == [s.val_acc for s in runs[1].history]
    assert [s.train_loss for s in runs[0].history] == [s.train_loss for s in runs[1].history]
    for a, b in zip(
        runs[0].student.state_dict().values(), runs[1].student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    other = train(tiny_recipe({"seed": 1}), synthetic, teacher=teacher)
    assert other.history[-1].train_loss != runs[0].history[-1].train_loss


def test_teacher_stays_frozen_and_in_eval_mode(synthetic: ImageData) -> None:
    teacher = _teacher(synthetic, epochs=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes: list[bool] = []
    train(tiny_recipe(), synthetic, lambda s: modes.append(teacher.training), teacher=teacher)
    assert modes == [False, False]
    assert not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: batch-norm statistics must stay"


def test_a_fixed_teacher_is_prepared_once_and_any_other_for_each_run(
    synthetic: ImageData,
) -> None:
    """A reused worker's trials fold and place their teacher once (`fixed`); a teacher given by
    a caller, whose weights may change between runs (in ways no version counter sees: through
    `.data`, a numpy view), is prepared for each run and distilled from as it is now."""
    cpu = torch.device("cpu")
    teacher = _teacher(synthetic, epochs=1)
    assert ready(teacher, cpu) is not ready(teacher, cpu)
    recipe = tiny_recipe({"schedule.epochs": 1})

    def losses(model: TapModel) -> list[tuple[float, dict[str, float], float]]:
        history = train(recipe, synthetic, teacher=model).history
        return [(s.train_loss, s.parts, s.val_loss) for s in history]

    first = losses(teacher)
    other = _teacher(synthetic, epochs=2)
    with torch.no_grad():
        mine, theirs = teacher.state_dict(keep_vars=True), other.state_dict()
        for key, tensor in mine.items():
            tensor.data.copy_(theirs[key])  # through `.data`: no version counter moves
    after = losses(teacher)
    assert after != first
    assert after == losses(other)
    assert fixed(other) is other and ready(other, cpu) is ready(other, cpu)
    assert losses(other) == after, "its one copy computes what a fresh one does"


def test_models_and_batches_are_channels_last(synthetic: ImageData) -> None:
    teacher = _teacher(synthetic, epochs=1)
    layouts: list[bool] = []
    first_conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_pre_hook(
        lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    result = train(tiny_recipe({"schedule.epochs": 1}), synthetic, teacher=teacher)
    hook.remove()
    for model in (result.student, teacher):
        convs = [p for p in model.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert layouts and all(layouts), "every batch reaches the teacher channels-last"


def test_the_terms_own_convolutions_are_channels_last_too(
    synthetic: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HSAKD's student heads are whole copied stages: left NCHW, oneDNN would convert every
    batch between layouts."""
    import kdsearch.train as train_module
    from kdsearch.losses import LOSSES

    teacher = _teacher(synthetic, epochs=1)
    heads = {"hsakd": LOSSES["hsakd"].teacher_heads(teacher, synthetic.num_classes)}
    trained: list[torch.nn.Parameter] = []
    real_sgd = train_module.sgd

    def recording_sgd(params, opt, lr):  # type: ignore[no-untyped-def]
        trained.extend(params)
        return real_sgd(trained, opt, lr)

    monkeypatch.setattr(train_module, "sgd", recording_sgd)
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "schedule.epochs": 1})
    result = train(recipe, synthetic, teacher=teacher, teacher_heads=heads)
    own = {id(p) for p in result.student.parameters()}
    term_convs = [p for p in trained if p.dim() == 4 and id(p) not in own]
    assert term_convs, "HSAKD's student heads train convolutions of their own"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in term_convs)


def test_kd_without_a_teacher_is_refused(synthetic: ImageData) -> None:
    with pytest.raises(RecipeError, match=r"distill\.kd needs a teacher"):
        train(tiny_recipe(), synthetic)


def test_all_weights_zero_is_refused(synthetic: ImageData) -> None:
    with pytest.raises(RecipeError, match="every term has weight 0"):
        train(tiny_recipe({"distill.kd.weight": 0.0, "distill.ce.weight": 0.0}), synthetic)


def test_non_finite_loss_stops_the_run(synthetic: ImageData) -> None:
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "optim.lr": 1.0e12, "schedule.epochs": 3})
    seen: list[EpochStats] = []
    with pytest.raises(NonFiniteLoss) as info:
        train(recipe, synthetic, seen.append)
    assert info.value.epoch == len(seen) + 1
    assert "lower optim.lr" in str(info.value)


def test_a_run_whose_last_update_diverged_stops_too(synthetic: ImageData) -> None:
    """One step an epoch: its loss, taken before the update, is finite, and the update sends
    the weights to infinity. The run ended "complete" with NaN weights (`kdsearch train`
    wrote them, and NaN into metrics.json, with exit status 0)."""
    recipe = tiny_recipe(
        {"distill.kd.weight": 0.0, "optim.lr": 1.0e30, "batch_size": 1024, "schedule.epochs": 1}
    )
    with pytest.raises(NonFiniteLoss) as info:
        train(recipe, synthetic)
    assert str(info.value).startswith("the validation loss became nan in epoch 1; lower optim.lr")


def test_multistep_and_cosine_schedules() -> None:
    step = tiny_recipe(
        {
            "schedule": {"epochs": 10, "kind": "multistep", "milestones": [4, 7], "gamma": 0.1},
            "optim.lr": 0.1,
        }
    )
    assert [round(lr_at(step, e), 6) for e in (0, 3, 4, 6, 7, 9)] == [
        0.1,
        0.1,
        0.01,
        0.01,
        0.001,
        0.001,
    ]
    cos = tiny_recipe({"schedule": {"epochs": 4, "kind": "cosine"}, "optim.lr": 0.1})
    assert [round(lr_at(cos, e), 6) for e in range(4)] == [0.1, 0.085355, 0.05, 0.014645]


def test_auto_device_and_precision_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # what Linux says this CPU has, independently of torch's probe
        flags = cpuinfo.read_text().split()
        amx = "amx_bf16" in flags
        native = amx or "avx512_bf16" in flags
        assert cpu_has_amx() == amx
        assert cpu_multiplies_bf16() == native
        assert autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else None)
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(RecipeError, match="fp16 needs CUDA"):
        autocast_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize(
    ("precision", "device"), [("fp32", "cpu"), ("bf16", "cpu"), ("fp16", "cuda")]
)
def test_a_run_records_its_precision_in_the_recipes_words(precision: str, device: str) -> None:
    recipe = tiny_recipe({"precision": precision, "device": device})
    assert trained_precision(recipe, torch.device(device)) == precision


@pytest.mark.parametrize(
    ("avx512_bf16", "has_amx", "kernel_allows", "expected"),
    [
        (False, True, True, torch.bfloat16),  # AMX the kernel lets the process use
        (False, True, False, None),
        (True, False, False, torch.bfloat16),  # AVX-512 BF16 alone (AMD Zen 4, Cooper Lake)
        (True, True, False, torch.bfloat16),  # AMX refused, AVX-512 BF16 still there
        (False, False, False, None),  # bf16 emulated (AVX2-only CPUs)
    ],
)
def test_auto_precision_on_the_cpu_is_bf16_only_where_it_multiplies_bf16(
    avx512_bf16: bool,
    has_amx: bool,
    kernel_allows: bool,
    expected: torch.dtype | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu_like(monkeypatch, avx512_bf16=avx512_bf16, amx=has_amx, amx_on=kernel_allows)
    assert autocast_dtype("auto", torch.device("cpu")) is expected
    assert autocast_dtype("fp32", torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("onednn", "dnnl", "expected"),
    [
        ("AVX2", None, None),  # bf16 at 0.11-0.12x fp32's speed there (README)
        ("avx512_core_vnni", None, None),  # oneDNN reads the value in any case
        (None, "AVX512_CORE", None),  # the older name, read where the new one is not set
        ("", "AVX2", None),  # an empty setting is skipped, as oneDNN skips it
        ("ALL", "AVX2", torch.bfloat16),  # the new name wins
        ("AVX512_CORE_BF16", None, torch.bfloat16),
        ("AVX512_CORE_AMX", None, torch.bfloat16),
        ("NOT_AN_ISA", None, torch.bfloat16),  # oneDNN ignores what it does not know
        ("ALL", None, torch.bfloat16),
        ("default", "AVX2", torch.bfloat16),  # DEFAULT caps nothing, and the new name wins
        (None, None, torch.bfloat16),
    ],
)
def test_auto_precision_on_the_cpu_is_fp32_where_onednn_is_capped_below_bf16(
    onednn: str | None,
    dnnl: str | None,
    expected: torch.dtype | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu_like(monkeypatch, avx512_bf16=True, amx=True, amx_on=True)
    for name, value in (("ONEDNN_MAX_CPU_ISA", onednn), ("DNNL_MAX_CPU_ISA", dnnl)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert autocast_dtype("auto", torch.device("cpu")) is expected
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # pinned, as asked


def test_a_cap_is_recorded_as_onednn_reads_it_and_a_setting_that_caps_nothing_as_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for value, cap in (
        ("avx2", "AVX2"),
        ("ALL", ""),
        ("default", ""),
        ("NOT_AN_ISA", ""),
        ("", ""),
    ):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        assert onednn_isa_cap() == cap, value
        assert (kernel_cap(torch.device("cpu")), kernel_cap(torch.device("cuda"))) == (cap, "")
    # as a study or meta.json holds it: None where it is not one (a hand-edited file)
    assert [recorded_cap(v) for v in ("avx2", "", "ALL", "FOO", None, 0)] == [
        "AVX2",
        "",
        "",
        None,
        None,
        None,
    ]


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 0), torch.float16), ((6, 1), None)],
)
def test_auto_precision_on_a_gpu_follows_its_native_formats(
    capability: tuple[int, int], expected: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 from Ampere (8.0) on; Volta and Turing only emulate it, but have fp16 tensor cores.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype("auto", torch.device("cuda")) is expected
    assert autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16  # asked for: given


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_asking_for_cuda_without_one_is_a_clear_error() -> None:
    with pytest.raises(RecipeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_asking_for_a_gpu_past_the_machines_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine of two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(RecipeError) as refused:  # a traceback from deep in .to() before
        resolve_device("cuda:2")
    assert str(refused.value) == (
        "device: cuda:2 asked for, but this machine's are cuda:0 to cuda:1"
    )


def test_bf16_autocast_trains_on_cpu(synthetic: ImageData) -> None:
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "precision": "bf16", "schedule.epochs": 3})
    result = train(recipe, synthetic)
    assert result.val_acc > 0.3
    assert all(p.dtype == torch.float32 for p in result.student.parameters())


def test_student_state_dict_loads_into_the_bare_architecture(synthetic: ImageData) -> None:
    teacher = _teacher(synthetic, epochs=1)
    result = train(tiny_recipe({"schedule.epochs": 1}), synthetic, teacher=teacher)
    bare = build_model("resnet8", synthetic.num_classes, synthetic.channels)
    bare.load_state_dict(result.student.state_dict())
    x = synthetic.val.x[:8].float() / 255
    with torch.no_grad():
        assert torch.allclose(bare.eval()(x), result.student.eval()(x), atol=1e-5)


@pytest.mark.parametrize(("precision", "rel"), [("fp32", 1e-4), ("bf16", 4e-3)])
def test_compile_gives_the_eager_run(synthetic: ImageData, precision: str, rel: float) -> None:
    """To rounding: bf16 keeps 8 significant bits, and fused kernels round at other places."""
    teacher = _teacher(synthetic, epochs=1)
    recipe = tiny_recipe({"schedule.epochs": 1, "precision": precision})
    eager = train(recipe, synthetic, teacher=teacher)
    with warnings.catch_warnings():  # a fallback to eager would pass unnoticed otherwise
        warnings.filterwarnings("error", message="torch.compile failed")
        compiled = train(recipe.override({"compile": True}), synthetic, teacher=teacher)
    assert compiled.history[0].train_loss == pytest.approx(eager.history[0].train_loss, rel=rel)
    assert compiled.val_acc == pytest.approx(eager.val_acc, abs=0.02)


def test_compile_that_fails_falls_back_to_eager_with_a_warning(
    synthetic: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fn: object, **options: object) -> object:
        def run(x: torch.Tensor) -> object:
            raise RuntimeError("no compiler for this operation\nsecond line")

        return run

    recipe = tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 1})
    eager = train(recipe, synthetic)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: no compiler"):
        fallback = train(recipe.override({"compile": True}), synthetic)
    assert fallback.history[0].train_loss == eager.history[0].train_loss


def test_compile_passes_running_out_of_memory_on_instead_of_falling_back(
    synthetic: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(fn: object, **options: object) -> object:
        def run(x: torch.Tensor) -> object:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return run

    monkeypatch.setattr(torch, "compile", out_of_memory)
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 1, "compile": True})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")
        with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
            train(recipe, synthetic)


@pytest.mark.parametrize(("device", "mode"), [("cpu", None), ("cuda", "reduce-overhead")])
def test_compile_replays_cuda_graphs_on_cuda_only(
    device: str, mode: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU a small model's step is bound by kernel launches, which CUDA graphs remove; on
    a CPU there are none to replay (tests/test_gpu.py trains every term this way on CUDA)."""
    asked: list[object] = []

    def recording(fn: object, **options: object) -> object:
        asked.append(options.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    taps = CompiledTaps(build_model("resnet8", 10, 3), torch.device(device))
    assert asked == [mode]
    assert taps.graphs == (mode is not None)  # the training loop marks each step's start then


def test_epochs_report_training_and_validation_time_apart(synthetic: ImageData) -> None:
    seen: list[EpochStats] = []
    train(tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 1}), synthetic, seen.append)
    assert seen[0].seconds > 0 and seen[0].eval_seconds > 0


def test_a_non_finite_loss_is_pickled_whole() -> None:
    """Ray carries a worker's exception to the driver pickled; an exception is unpickled from
    its message alone, which this one's constructor did not take (a TypeError instead)."""
    err = NonFiniteLoss(
        3, float("nan"), "validation", run="training the teacher", hint="lower teacher.train.lr"
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NonFiniteLoss and str(back) == str(err)
    assert (back.epoch, back.which, back.run, back.hint) == (3, "validation", err.run, err.hint)
