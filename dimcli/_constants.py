"""Constants the command line needs to build its options, without importing torch.

`dim --help` and shell completion build every command's options; their help texts and
defaults name these values. They live here, in a module that imports nothing heavy, and
are re-exported by the modules they belong to (`dimcli.export`, `dimcli.probe`).
"""

from __future__ import annotations

# ==== dimcli.export ====

# Format name -> file extension. `--format` takes a name; without it the extension decides.
FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".pt",
    "pt2": ".pt2",
    "safetensors": ".safetensors",
}
DEFAULT_OPSET = 18

# ==== dimcli.probe ====

PROBE_METHODS: tuple[str, ...] = ("linear", "knn", "mlp")
# The paper fixes lr and batch but not the epochs. 50 epochs is about 6k Adam steps for 8k
# training images (tens of seconds on a CPU); small data sets get few steps, so raise it there.
DEFAULT_MLP_EPOCHS = 50
DEFAULT_K = 20
