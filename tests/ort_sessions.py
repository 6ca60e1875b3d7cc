"""ONNX Runtime sessions for the tests' agreement checks."""

from __future__ import annotations


def exact_session(path, threads: int | None = None):
    """A CPU session that runs the int8 arithmetic the file describes.

    On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits and
    saturate, which moves 8-bit models' top-1 by a few percent (``session.x64quantprecision`` turns that
    off; it changes nothing on CPUs with VNNI or on Arm). The tests check the file, not that CPU.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
