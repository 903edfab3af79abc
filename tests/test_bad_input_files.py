"""Bad user files in all five commands: recipes in other encodings, damaged safetensors at every reading site,
broken JSON and JSON Lines, empty data, custom-code bases without trust, impossible block counts and nonsense
hyper-parameters. Each case must end in exit 2, one line naming the culprit, no traceback, and every file the
user had byte-identical (tests/user_files.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama
from user_files import Case, check_case

from diablo_cli import AdapterSettingError, DiaBloConfig, DiaBloError, attach_diablo, save_adapter
from diablo_cli.models import tiny_model_dir
from diablo_cli.reading import open_safetensors, read_json, read_json_lines, read_text

SOURCES: dict[str, Path] = {}
"""Files built once per module and copied into each case's folder: a good adapter for the tiny model."""

EXAMPLE = {"prompt": "What is 2 + 2?", "completion": "4"}
RECIPE = {
    "base_model": "tiny-random-llama",
    "model": {"dtype": "fp32"},
    "adapter": {"blocks": 4, "target_modules": "QV"},
    "data": {"datasets": [{"path": "data.jsonl", "format": "prompt_completion"}], "max_length": 32},
    "training": {"max_steps": 1, "micro_batch_size": 2, "logging_steps": 1},
    "eval": {"compare_base": False},
    "output": {"dir": "out/run"},
}
CUSTOM_CODE_RAN = "custom-code-ran"
"""The custom-code base's modelling file writes this file when imported: a case that leaves it has run it."""


@pytest.fixture(scope="module", autouse=True)
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    model = attach_diablo(tiny_llama(), DiaBloConfig(blocks=4, target_modules="QV"))
    SOURCES["adapter"] = save_adapter(model, folder / "adapter", base_model=str(tiny_model_dir()))
    SOURCES["peft"] = peft_adapter(folder / "peft")
    yield
    SOURCES.clear()


def peft_adapter(folder: Path) -> Path:
    """A LoRA adapter as PEFT saves it (another tool's adapter, or a `type: lora` run)."""
    peft = pytest.importorskip("peft")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir())  # PEFT records the in-memory model's (none)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


# --- what the user's folder holds -----------------------------------------------------------------------------


def data_file(root: Path, name: str = "data.jsonl", rows: int = 8) -> str:
    (root / name).write_text("".join(json.dumps(EXAMPLE) + "\n" for _ in range(rows)), encoding="utf-8")
    return name


def recipe(root: Path, name: str = "recipe.yaml", **changes) -> str:
    document = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            document.setdefault(section, {})[field] = value
        else:
            document[section] = value
    (root / name).write_text(yaml.safe_dump(document), encoding="utf-8")
    if not (root / "data.jsonl").exists():
        data_file(root)
    return name


def adapter(root: Path, name: str = "adapter", kind: str = "adapter") -> Path:
    return Path(shutil.copytree(SOURCES[kind], root / name))


def model_folder(root: Path, name: str = "model") -> Path:
    """A copy of the tiny model folder (what a merge or a download leaves)."""
    return Path(shutil.copytree(tiny_model_dir(), root / name))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def custom_code_base(root: Path, name: str = "custom") -> str:
    """A model folder whose config.json needs its own code: an unknown model_type and an auto_map naming a
    modelling file, as a hub repo with custom code has."""
    folder = model_folder(root, name)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="diablo-test-custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    marker = f"open({CUSTOM_CODE_RAN!r}, 'w').close()\n"
    (folder / "configuration_custom.py").write_text(marker)
    (folder / "modeling_custom.py").write_text(marker)
    return name


def damaged_model(root: Path, name: str = "model") -> str:
    truncate(model_folder(root, name) / "model.safetensors")
    return name


def damaged_adapter(root: Path, *, empty: bool = False, junk: bool = False, kind: str = "adapter") -> str:
    weights = adapter(root, kind=kind) / "adapter_model.safetensors"
    if empty:
        weights.write_bytes(b"")
    elif junk:
        weights.write_bytes(b"this is not a safetensors file at all\n" * 20)
    else:
        truncate(weights)
    return "adapter"


def adapter_with_config(root: Path, text: bytes) -> str:
    (adapter(root) / "adapter_config.json").write_bytes(text)
    return "adapter"


def eval_loss(*args: str) -> list[str]:
    return ["eval", *args, "--task", "loss", "--data", "data.jsonl", "--limit", "2", "--dtype", "fp32"]


# --- setups: each writes the user's files and returns the command's arguments ----------------------------------


def recipe_latin1(root):
    (root / "recipe.yaml").write_bytes("base_model: tiny-random-llama\n# café\n".encode("latin-1"))
    return ["train", "recipe.yaml"]


def recipe_utf16(root, encoding="utf-16"):
    (root / "recipe.yaml").write_bytes(yaml.safe_dump(RECIPE).encode(encoding))
    data_file(root)
    return ["train", "recipe.yaml"]


def recipe_binary(root):
    (root / "recipe.yaml").write_bytes(bytes(range(256)) * 4)
    return ["train", "recipe.yaml"]


def parent_latin1(root):
    (root / "parent.yaml").write_bytes("training:\n  seed: 1  # réglé\n".encode("latin-1"))
    recipe(root, "child.yaml")
    child = yaml.safe_load((root / "child.yaml").read_text())
    (root / "child.yaml").write_text(yaml.safe_dump({"extends": "parent.yaml", **child}))
    return ["train", "child.yaml"]


def set_not_utf8(root):
    return ["train", recipe(root), "--set", "training.seed=1\udce9"]  # what Python makes of a Latin-1 é in argv


def recipe_bad_yaml(root):
    data_file(root)
    (root / "recipe.yaml").write_text(
        "base_model: tiny-random-llama\ndata:\n  datasets: []\n  max_length: 32\n   seed: 1\n"
    )
    return ["train", "recipe.yaml"]


def inspect_recipe_utf16(root):
    recipe_utf16(root)
    return ["inspect", "recipe.yaml"]


def eval_recipe_latin1(root):
    recipe_latin1(root)
    return ["eval", "recipe.yaml", "--adapter", str(adapter(root))]


def jsonl_broken_at(line: int, blank_lines: int = 0):
    def setup(root):
        rows = [""] * blank_lines + [json.dumps(EXAMPLE)] * 8
        rows.insert(line - 1, '{"prompt": "a" "completion": "b"}')
        (root / "data.jsonl").write_text("\n".join(rows) + "\n")
        return ["train", recipe(root), "--dry-run"]

    return setup


def json_broken(root):
    (root / "data.json").write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a", completion}\n]\n')
    return [
        "train",
        recipe(root, data={"datasets": [{"path": "data.json", "format": "prompt_completion"}]}),
        "--dry-run",
    ]


def data_bytes(content: bytes, name: str = "data.jsonl"):
    def setup(root):
        (root / name).write_bytes(content)
        datasets = [{"path": name, "format": "prompt_completion"}]
        return ["train", recipe(root, data={"datasets": datasets}), "--dry-run"]

    return setup


def eval_data_broken(root):
    data_file(root)
    with open(root / "data.jsonl", "a") as handle:
        handle.write("{not json}\n")
    return eval_loss("--base", "tiny-random-llama")


def eval_data_empty(root):
    (root / "data.jsonl").write_bytes(b"")
    return eval_loss("--base", "tiny-random-llama")


def quantize_calibration_latin1(root):
    (root / "calibration.txt").write_bytes("Un texte réglé en Latin-1.\n\nEncore.\n".encode("latin-1"))
    source = ["--calibration", "calibration.txt", "--samples", "1", "--seq-len", "8"]
    return ["quantize", "--base", "tiny-random-llama", "-o", "quantized", "--method", "rtn", *source]


def command_on_damaged_adapter(command: str, **damage):
    def setup(root):
        folder = damaged_adapter(root, **damage)
        if command == "merge":
            return ["merge", "-a", folder, "-o", "merged", "--dtype", "fp32"]
        if command == "inspect":
            return ["inspect", folder]
        data_file(root)
        return eval_loss("-a", folder, "--no-base")

    return setup


def command_on_adapter_config(command: str, text: bytes):
    def setup(root):
        folder = adapter_with_config(root, text)
        if command == "merge":
            return ["merge", "-a", folder, "-o", "merged"]
        if command == "inspect":
            return ["inspect", folder]
        data_file(root)
        return eval_loss("-a", folder, "--no-base")

    return setup


def saved_recipe_latin1(command: str):
    """A run folder whose recipe.yaml (the base it names is read from it) was edited and saved as Latin-1."""

    def setup(root):
        (adapter(root) / "recipe.yaml").write_bytes("base_model: tiny-random-llama  # modèle\n".encode("latin-1"))
        if command == "merge":
            return ["merge", "-a", "adapter", "-o", "merged"]
        data_file(root)
        return eval_loss("-a", "adapter", "--no-base")

    return setup


def merge_damaged_base(root):
    return ["merge", "-a", str(adapter(root)), "--base", damaged_model(root), "-o", "merged", "--dtype", "fp32"]


def merge_base_config_broken(root):
    base = model_folder(root)
    (base / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    return ["merge", "-a", str(adapter(root)), "--base", "model", "-o", "merged"]


def eval_damaged_merged(root):
    data_file(root)
    return eval_loss("--model", damaged_model(root, "merged"), "--no-base")


def eval_merged_config_empty(root):
    data_file(root)
    (model_folder(root, "merged") / "config.json").write_bytes(b"")
    return eval_loss("--model", "merged", "--no-base")


def quantize_damaged_source(root):
    return ["quantize", "--base", damaged_model(root), "-o", "quantized", "--method", "rtn", "--samples", "1"]


def inspect_damaged_model(root):
    return ["inspect", damaged_model(root)]


def train_damaged_base(root):
    return ["train", recipe(root, base_model=damaged_model(root))]


def custom_code_in(command: str):
    def setup(root):
        base = custom_code_base(root)
        if command == "train":
            return ["train", recipe(root, base_model=base)]
        if command == "merge":
            return ["merge", "-a", str(adapter(root)), "--base", base, "-o", "merged"]
        if command == "inspect":
            return ["inspect", base]
        if command == "quantize":
            return ["quantize", "--base", base, "-o", "quantized", "--method", "rtn", "--samples", "1"]
        data_file(root)
        return eval_loss("--base", base)

    return setup


def recipe_with(*overrides: str, dry_run: bool = True):
    def setup(root):
        args = [item for override in overrides for item in ("--set", override)]
        return ["train", recipe(root), *args, *(["--dry-run"] if dry_run else [])]

    return setup


def inspect_recipe_blocks(root):
    return ["inspect", recipe(root, adapter={"blocks": 100000, "target_modules": "QV"})]


BYTE = ("UTF-8", "byte")

CASES = [
    # Recipes in other encodings, their parents, --set values and YAML errors.
    Case("train-recipe-latin1", recipe_latin1, ("recipe.yaml", *BYTE)),
    Case("train-recipe-utf16-bom", recipe_utf16, ("recipe.yaml", "UTF-16", "UTF-8")),
    Case("train-recipe-utf16-no-bom", lambda root: recipe_utf16(root, "utf-16-le"), ("recipe.yaml", *BYTE)),
    Case("train-recipe-binary", recipe_binary, ("recipe.yaml", *BYTE)),
    Case("train-extends-parent-latin1", parent_latin1, ("parent.yaml", *BYTE)),
    Case("train-set-value-not-utf8", set_not_utf8, ("--set", "training.seed", "UTF-8")),
    Case("train-recipe-yaml-error", recipe_bad_yaml, ("recipe.yaml", "line 5")),
    Case("inspect-recipe-utf16", inspect_recipe_utf16, ("recipe.yaml", "UTF-16")),
    Case("eval-recipe-latin1", eval_recipe_latin1, ("recipe.yaml", *BYTE)),
    # Data files: the true line, empty files, encodings.
    Case("train-jsonl-broken-line-3", jsonl_broken_at(3), ("data.jsonl", "line 3 ")),
    Case("train-jsonl-broken-line-7-after-blanks", jsonl_broken_at(7, blank_lines=2), ("data.jsonl", "line 7 ")),
    Case("train-json-broken-line-3", json_broken, ("data.json", "line 3,")),
    Case("train-data-0-bytes", data_bytes(b""), ("data.jsonl", "empty")),
    Case("train-data-whitespace-only", data_bytes(b"\n  \n\t\n"), ("data.jsonl", "empty")),
    Case("train-data-latin1", data_bytes('{"prompt": "café", "completion": "b"}\n'.encode("latin-1")), BYTE),
    Case("train-data-utf16", data_bytes(json.dumps(EXAMPLE).encode("utf-16")), ("data.jsonl", "UTF-16")),
    Case("train-csv-empty", data_bytes(b"", "data.csv"), ("data.csv", "empty")),
    Case("eval-data-broken-line-9", eval_data_broken, ("data.jsonl", "line 9 ")),
    Case("eval-data-empty", eval_data_empty, ("data.jsonl", "empty")),
    Case("quantize-calibration-latin1", quantize_calibration_latin1, ("calibration.txt", *BYTE)),
    # Damaged safetensors at every reading site.
    Case("merge-adapter-truncated", command_on_damaged_adapter("merge"), ("adapter_model.safetensors", "truncated")),
    Case(
        "merge-adapter-junk", command_on_damaged_adapter("merge", junk=True), ("adapter_model.safetensors", "damaged")
    ),
    Case("merge-adapter-0-bytes", command_on_damaged_adapter("merge", empty=True), ("adapter_model.safetensors",)),
    Case(
        "inspect-adapter-truncated", command_on_damaged_adapter("inspect"), ("adapter_model.safetensors", "truncated")
    ),
    Case("eval-adapter-truncated", command_on_damaged_adapter("eval"), ("adapter_model.safetensors", "truncated")),
    Case(
        "merge-peft-adapter-truncated",
        command_on_damaged_adapter("merge", kind="peft"),
        ("adapter/adapter_model.safetensors", "truncated"),
    ),
    Case(
        "eval-peft-adapter-truncated",
        command_on_damaged_adapter("eval", kind="peft"),
        ("adapter/adapter_model.safetensors", "truncated"),
    ),
    Case("merge-base-shard-truncated", merge_damaged_base, ("model/model.safetensors", "truncated", "download")),
    Case("eval-merged-folder-truncated", eval_damaged_merged, ("merged/model.safetensors", "truncated")),
    Case("quantize-source-truncated", quantize_damaged_source, ("model/model.safetensors", "truncated")),
    Case("inspect-model-truncated", inspect_damaged_model, ("model/model.safetensors", "truncated")),
    Case("train-base-truncated", train_damaged_base, ("model/model.safetensors", "truncated")),
    # JSON config files.
    Case(
        "merge-adapter-config-broken",
        command_on_adapter_config("merge", b'{"format": "diablo-adapter",\n  x}'),
        ("adapter_config.json", "line 2"),
    ),
    Case(
        "inspect-adapter-config-broken",
        command_on_adapter_config("inspect", b"{\n\n  [1, 2}"),
        ("adapter_config.json", "line 3"),
    ),
    Case(
        "eval-adapter-config-latin1",
        command_on_adapter_config("eval", '{"base": "é"}'.encode("latin-1")),
        ("adapter_config.json", *BYTE),
    ),
    Case("eval-adapter-config-empty", command_on_adapter_config("eval", b""), ("adapter_config.json", "empty")),
    Case("merge-saved-recipe-latin1", saved_recipe_latin1("merge"), ("adapter/recipe.yaml", *BYTE)),
    Case("eval-saved-recipe-latin1", saved_recipe_latin1("eval"), ("adapter/recipe.yaml", *BYTE)),
    Case("merge-base-config-broken", merge_base_config_broken, ("model/config.json", "line 3")),
    Case("eval-merged-config-empty", eval_merged_config_empty, ("merged/config.json", "empty")),
    # Custom-code bases without trust: every command names trust_remote_code and runs none of the code.
    Case("train-custom-code", custom_code_in("train"), ("custom", "trust_remote_code")),
    Case("eval-custom-code", custom_code_in("eval"), ("custom", "--trust-remote-code")),
    Case("merge-custom-code", custom_code_in("merge"), ("custom", "--trust-remote-code")),
    Case("inspect-custom-code", custom_code_in("inspect"), ("custom", "--trust-remote-code")),
    Case("quantize-custom-code", custom_code_in("quantize"), ("custom", "--trust-remote-code")),
    # Impossible block counts.
    Case("train-dry-run-blocks-100000", recipe_with("adapter.blocks=100000"), ("adapter.blocks", "100000", "1–32")),
    Case("train-blocks-65", recipe_with("adapter.blocks=65"), ("adapter.blocks", "smaller side", "1–32")),
    Case(
        "train-blocks-by-module-too-many",
        recipe_with("adapter.target_modules=QVD", "adapter.blocks_by_module.D=100"),
        ("adapter.blocks_by_module['D']", "down_proj", "1–64"),
    ),
    Case(
        "train-blocks-100000-no-dry-run",
        recipe_with("adapter.blocks=100000", dry_run=False),
        ("adapter.blocks", "1–32"),
        created=("out",),  # the run folder is made before the base loads; its removal is the run folder's job
    ),
    Case("inspect-recipe-blocks-100000", inspect_recipe_blocks, ("adapter.blocks", "1–32")),
    Case(
        "train-target-modules-one-typo",
        recipe_with("adapter.target_modules=[q_proj, vproj]"),
        ("adapter.target_modules", "'vproj' names no linear layer", "did you mean 'v_proj'?"),
    ),
    Case(
        "train-lora-target-modules-one-typo",
        recipe_with("adapter.type=lora", "adapter.r=2", "adapter.target_modules=[q_proj, vproj]"),
        ("adapter.target_modules", "'vproj' names no linear layer", "did you mean 'v_proj'?"),
    ),
    # Nonsense hyper-parameters, caught before work starts.
    Case(
        "train-learning-rate-1e12",
        recipe_with("training.learning_rate=1.0e12"),
        ("training.learning_rate", "at most 1"),
    ),
    Case("train-learning-rate-nan", recipe_with("training.learning_rate=.nan"), ("training.learning_rate", "finite")),
    Case("train-learning-rate-0", recipe_with("training.learning_rate=0"), ("training.learning_rate", "above 0")),
    Case("train-epochs-1e9", recipe_with("training.epochs=1.0e9"), ("training.epochs", "at most 1000")),
    Case("train-weight-decay-5", recipe_with("training.weight_decay=5"), ("training.weight_decay", "at most 1")),
    Case("train-adam-epsilon-5", recipe_with("training.adam_epsilon=5"), ("training.adam_epsilon", "below 1")),
    Case("train-warmup-ratio-1.5", recipe_with("training.warmup_ratio=1.5"), ("training.warmup_ratio", "below 1")),
    Case("train-seed-negative", recipe_with("training.seed=-1"), ("training.seed", "at least 0")),
    Case("train-max-grad-norm-inf", recipe_with("training.max_grad_norm=.inf"), ("training.max_grad_norm", "finite")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_user_file(case: Case, tmp_path: Path) -> None:
    outcome = check_case(case, tmp_path)
    assert not (tmp_path / CUSTOM_CODE_RAN).exists()
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome.stderr


def test_the_table_covers_every_command() -> None:
    assert len(CASES) >= 30
    commands = {case.id.split("-")[0] for case in CASES}
    assert commands == {"train", "eval", "merge", "quantize", "inspect"}


# --- the helpers themselves, and the API ------------------------------------------------------------------------


def test_text_errors_give_the_offset_of_the_first_bad_byte(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"abc\xe9def")
    with pytest.raises(DiaBloError, match=r"notes.txt is not UTF-8 text \(byte 3 is 0xe9\)"):
        read_text(path, "notes")
    path.write_bytes("\ufeffbom first".encode())  # a UTF-8 byte-order mark is fine, and dropped
    assert read_text(path) == "bom first"


def test_json_lines_name_the_line_of_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n{"a": 4}\n')
    with pytest.raises(DiaBloError, match=r"rows.jsonl: line 4 is not valid JSON"):
        read_json_lines(path)
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_json_lines(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a":\n [1,\n 2,,\n]}')
    with pytest.raises(DiaBloError, match=r"line 3, column 4"):
        read_json(path)


def test_damaged_safetensors_name_the_file_and_what_to_do(tmp_path):
    weights = Path(shutil.copytree(SOURCES["adapter"], tmp_path / "a")) / "adapter_model.safetensors"
    with open_safetensors(weights) as reader:  # intact: opens as safe_open does
        assert reader.keys()
    truncate(weights, keep=0.9)
    damaged = pytest.raises(DiaBloError, match=r"a/adapter_model.safetensors is damaged or truncated .*; do this")
    with damaged, open_safetensors(weights, "do this"):
        pass


def test_attach_refuses_more_blocks_than_a_layer_has_and_names_the_range():
    with pytest.raises(AdapterSettingError, match=r"^blocks: 100 exceeds q_proj's smaller side \(64.*valid.*1–64"):
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=100, target_modules="Q"))
    with pytest.raises(AdapterSettingError, match=r"^blocks: 33 exceeds k_proj's smaller side \(32"):
        attach_diablo(tiny_llama(), DiaBloConfig(blocks=33, target_modules="QK"))
    attach_diablo(tiny_llama(), DiaBloConfig(blocks=32, target_modules="QK"))  # the edge of the range is fine


def test_a_trusted_custom_code_base_is_let_through_to_transformers(tmp_path):
    """Trust switches the refusal off: what runs then is the base's own code (here, it drops its marker)."""
    from diablo_cli.models import check_local_model

    custom_code_base(tmp_path)
    with pytest.raises(DiaBloError, match="trust_remote_code"):
        check_local_model(tmp_path / "custom", "custom", trust_remote_code=False)
    check_local_model(tmp_path / "custom", "custom", trust_remote_code=True)
