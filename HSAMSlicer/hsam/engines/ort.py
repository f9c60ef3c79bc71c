"""ONNX Runtime engine for the whole H-SAM forward (images [1,3,S,S] -> fused logits [1,K,S,S]) on the CPU.

The model is exported once (TorchScript exporter, fixed batch 1, LoRA merged, the exact work-saving encoder of
:mod:`hsam.engines.vit`) and cached under ``hsam_home()/onnx/<fingerprint>/``; ``int8`` then quantizes the weight x
activation MatMuls of the *encoder blocks* dynamically (int8 weights per output channel, uint8 activations per
tensor and call). Activation x activation MatMuls (attention), convolutions, the neck and both decoders stay fp32.

Optional dependency: ``pip install "hsam[onnx]"`` (onnxruntime, onnx).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hsam import atomic
from hsam.errors import HSAMError

log = logging.getLogger(__name__)

# bump when the exported graph or the quantisation recipe changes (invalidates caches); 2: the fused LayerNorm2d
EXPORT_VERSION = 2


def available() -> bool:
    """True when onnxruntime (and onnx, for quantisation) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise HSAMError('the ONNX Runtime modes need onnxruntime and onnx: pip install "hsam[onnx]" (or use --mode fast)')


class _Predict(nn.Module):
    """images -> (fused logits [B,K,S,S], encoder embedding [B,256,g,g]) of an HSAM (for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.model.image_encoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            stage1, stage2 = self.model(images)
        finally:
            handle.remove()
        # the embedding is a second output so benchmarks can measure the encoder's error; inference fetches logits only
        return (stage1["masks"] + stage2["masks"]) / 2, captured[0]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, bytes): identifies the exported graph's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(str(data.dtype).encode())
        # reshape(-1): 0-d buffers (BatchNorm's num_batches_tracked in the Lite TinyViT) cannot be viewed as bytes
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_dir(model: nn.Module, root: Path | None = None) -> Path:
    """Folder for this model's exported graphs (keyed by weights, config, export version, torch version)."""
    from hsam.paths import hsam_home

    key = hashlib.sha256(
        f"{model_fingerprint(model)}|{getattr(model, 'config', '')}|{EXPORT_VERSION}|{torch.__version__}".encode()
    ).hexdigest()[:24]
    return Path(root or (hsam_home() / "onnx")) / key


def _atomic_save(write, path: Path) -> None:  # noqa: ANN001 (write: Callable[[str], None])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path, suffix=".onnx") as temp:
        write(str(temp))


def export_fp32(fast_model: nn.Module, path: Path) -> Path:
    """Export ``fast_model.predict`` (an HSAM with a fast encoder, eval, LoRA merged) at batch 1 to ``path``."""
    size = int(fast_model.img_size)
    example = torch.zeros(1, 3, size, size)

    def write(temp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer/deprecation chatter from the TorchScript exporter
            torch.onnx.export(
                _Predict(fast_model).eval(), (example,), temp, input_names=["images"], output_names=["logits", "embedding"],
                opset_version=17, dynamo=False,
            )

    _atomic_save(write, path)
    return path


def encoder_weight_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMul nodes of the encoder blocks whose second input is a weight (an initializer)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    # weights reached through a Constant node or an Identity of an initializer count too
    constants = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    aliases = {node.output[0] for node in graph.node if node.op_type == "Identity" and node.input[0] in weights}
    names = []
    for node in graph.node:
        if node.op_type != "MatMul" or "image_encoder" not in node.name or "/blocks." not in node.name:
            continue
        if node.input[1] in weights or node.input[1] in constants or node.input[1] in aliases:
            names.append(node.name)
    return names


def quantize_int8(fp32_path: Path, path: Path, exclude_blocks: tuple[int, ...] = ()) -> Path:
    """Dynamic int8 quantisation of the encoder's weight MatMuls (per-channel int8 weights, reduce_range)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n for n in encoder_weight_matmuls(fp32_path) if not any(f"/blocks.{b}/" in n for b in exclude_blocks)]
    if not nodes:
        raise HSAMError(f"{fp32_path}: found no encoder MatMul to quantize; the export layout changed")

    def write(temp: str) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a generic "consider pre-processing" advice on the root logger
        try:
            quantize_dynamic(
                str(fp32_path), temp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"],
            )
        finally:
            root.setLevel(level)

    _atomic_save(write, path)
    return path


class OrtPredictor:
    """``__call__(images [B,3,S,S] float32 tensor) -> logits [B,K,S,S] float32 tensor`` through ONNX Runtime."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, images: torch.Tensor, outputs: tuple[str, ...] = ("logits",)) -> list[torch.Tensor]:
        """The named graph outputs for images [B,3,S,S] (run one slice at a time: the graph has batch 1)."""
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        per_slice = [self.session.run(list(outputs), {self.input_name: array[i : i + 1]}) for i in range(len(array))]
        return [torch.from_numpy(np.concatenate([r[k] for r in per_slice], axis=0)) for k in range(len(outputs))]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)[0]


def build(fast_model: nn.Module, source_model: nn.Module, int8: bool, root: Path | None = None,
          exclude_blocks: tuple[int, ...] = (), say: Any = None) -> OrtPredictor:
    """An :class:`OrtPredictor` for ``source_model``, exporting (and quantizing) into the cache on first use."""
    require()
    folder = cache_dir(source_model, root)
    fp32_path = folder / "model_fp32.onnx"
    if not fp32_path.is_file():
        if say:
            say("preparing the ONNX Runtime model (once per model, about a minute)")
        export_fp32(fast_model, fp32_path)
    path = fp32_path
    if int8:
        tag = "".join(f"-x{b}" for b in sorted(exclude_blocks))
        path = folder / f"model_int8{tag}.onnx"
        if not path.is_file():
            quantize_int8(fp32_path, path, exclude_blocks)
    return OrtPredictor(path)
