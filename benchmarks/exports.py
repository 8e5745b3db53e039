"""Batch-1 latency, size and parity of every exported format."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def latency(call: Callable[[], Any], calls: int) -> dict[str, float]:
    """p50 and p99 microseconds of `call`, after a warm-up of up to 100 calls."""
    for _ in range(min(100, calls)):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return {"p50_us": float(np.percentile(samples, 50)), "p99_us": float(np.percentile(samples, 99)), "calls": calls}


def bench_exports(version_dir: Path, calls: int) -> dict[str, Any]:
    """Batch-1 latency of the SavedModel signature and each TFLite file, plus size and parity."""
    import tensorflow as tf

    from ai_edge_litert.interpreter import Interpreter

    from lenet_tf.inference import INPUT_KEY, METADATA_FILE, SIGNATURE_KEY
    from lenet_tf.quiet import native_stderr_silenced

    card = json.loads((version_dir / METADATA_FILE).read_text())
    image = np.zeros((1, 28, 28, 1), np.uint8)
    results = {}
    serve = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_KEY]
    tensor = tf.constant(image)
    saved_model_bytes = sum(entry["bytes"] for name, entry in card["files"].items()
                            if not name.endswith((".tflite", ".onnx")))
    results["saved_model"] = {"bytes": saved_model_bytes, **latency(lambda: serve(image=tensor), max(200, calls // 10))}
    for path in sorted(version_dir.glob("*.tflite")):
        variant = path.name.split(".")[1]
        with native_stderr_silenced():
            runner_interpreter = Interpreter(model_path=str(path))
            direct = Interpreter(model_path=str(path))
        runner = runner_interpreter.get_signature_runner(SIGNATURE_KEY)
        runner_latency = latency(lambda runner=runner: runner(**{INPUT_KEY: image}), calls)
        # The interpreter API proper (set_tensor, invoke, get_tensor) skips the
        # signature runner's per-call dictionary and shape checks. A second
        # interpreter, so no array from the runner pins the first one's buffers.
        details = direct.get_signature_runner(SIGNATURE_KEY)
        input_details = details.get_input_details()[INPUT_KEY]
        output_index = details.get_output_details()["probabilities"]["index"]
        del details  # It holds the interpreter's buffers, which allocate_tensors refuses.
        direct.allocate_tensors()
        feed = image.astype(input_details["dtype"])

        def invoke(direct=direct, input_index=input_details["index"], output_index=output_index, feed=feed):
            direct.set_tensor(input_index, feed)
            direct.invoke()
            return direct.get_tensor(output_index)

        results[variant] = {"bytes": path.stat().st_size, **latency(invoke, calls),
                            "signature_runner_p50_us": runner_latency["p50_us"]}
    onnx_path = version_dir / "lenet.onnx"
    if onnx_path.is_file():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        results["onnx"] = {"bytes": onnx_path.stat().st_size,
                           **latency(lambda: session.run(["probabilities"], {"image": image}), calls)}
    web_model = version_dir / "web" / "lenet.web.onnx"
    if web_model.is_file():
        results["web"] = {"bytes": web_model.stat().st_size, **web_page_latency(version_dir, calls=200)}
    for name, numbers in results.items():
        numbers.update(card["parity"].get(name, {}))
    results["_keras_test_accuracy"] = card["parity"]["keras"]["test_accuracy"]
    return results


def web_page_latency(version_dir: Path, calls: int) -> dict[str, float]:
    """Batch-1 latency measured inside the exported web page (performance.now(), whose
    resolution in a page is 0.1 ms), in Debian's Chromium driven by Playwright."""
    import threading

    from playwright.sync_api import sync_playwright

    from lenet_tf.webpage import make_server, web_dir_of

    server = make_server(web_dir_of(version_dir), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.evaluate("window.lenet.ready")
            measured = page.evaluate(f"window.lenet.benchmark({calls})")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return {"p50_us": measured["p50_ms"] * 1000, "p99_us": measured["p99_ms"] * 1000, "calls": calls}
