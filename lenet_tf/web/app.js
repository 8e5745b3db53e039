// The page: a drawing pad and an image picker in, the model's top classes and
// its conv1/conv2 activation maps out. The model runs here, with
// onnxruntime-web's WebAssembly backend; preprocessing is preprocess.js, the
// same steps as `lenet-tf predict`.
import * as ort from "./ort.wasm.min.mjs";
import { preprocessRGBA } from "./preprocess.js";

// One thread: multi-threaded WebAssembly needs a cross-origin-isolated page,
// which a plain static file server does not give.
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL("./", import.meta.url).href;
ort.env.logLevel = "error";

const TOP = 5;
const STROKE_WIDTH = 22;  // On the 280-pixel pad: about the stroke of an MNIST digit once framed.
const element = (id) => document.getElementById(id);
let config, session, constants;

async function load() {
  const response = await fetch(new URL("model.json", import.meta.url));
  config = await response.json();
  constants = config.preprocessing;
  session = await ort.InferenceSession.create(new URL(config.model_file, import.meta.url).href,
    { executionProviders: ["wasm"] });
}

// uint8 pixels of one 28x28 image -> probabilities and activation maps.
async function classify(pixels) {
  const size = constants.image_size;
  const input = new ort.Tensor("uint8", Uint8Array.from(pixels), [1, size, size, 1]);
  const outputs = await session.run({ [config.input_name]: input });
  const maps = (name) => ({ data: outputs[name].data, dims: outputs[name].dims.slice(1) });
  return { probabilities: Array.from(outputs.probabilities.data), conv1: maps("conv1"), conv2: maps("conv2") };
}

function showMessage(text) {
  const message = element("message");
  message.textContent = text;
  message.hidden = !text;
}

function showPredictions(probabilities) {
  const order = probabilities.map((probability, index) => [probability, index]).sort((a, b) => b[0] - a[0]);
  const list = element("predictions");
  list.replaceChildren(...order.slice(0, TOP).map(([probability, index]) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = config.class_names[index];
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${(probability * 100).toFixed(1)}%`;
    bar.append(fill);
    const percent = document.createElement("span");
    percent.className = "percent";
    percent.textContent = `${(probability * 100).toFixed(1)}%`;
    item.append(name, bar, percent);
    return item;
  }));
}

// One small picture per channel, each scaled to its own range (weak channels stay visible).
function showMaps(containerId, { data, dims }) {
  const [height, width, channels] = dims;
  const container = element(containerId);
  const canvases = Array.from({ length: channels }, (_, channel) =>
    container.children[channel] || Object.assign(document.createElement("canvas"), {
      width, height, title: `${containerId} channel ${channel}` }));
  canvases.forEach((canvas, channel) => {
    let low = Infinity, high = -Infinity;
    for (let index = channel; index < data.length; index += channels) {
      low = Math.min(low, data[index]); high = Math.max(high, data[index]);
    }
    const image = new ImageData(width, height);
    for (let pixel = 0; pixel < width * height; pixel++) {
      const value = high > low ? (data[pixel * channels + channel] - low) / (high - low) : 0;
      const level = Math.round(255 * value);
      image.data.set([level, level, level, 255], pixel * 4);
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
  });
  if (container.children.length !== channels) container.replaceChildren(...canvases);
}

function showInput(pixels) {
  const size = constants.image_size;
  const image = new ImageData(size, size);
  pixels.forEach((value, index) => image.data.set([value, value, value, 255], index * 4));
  element("seen").getContext("2d").putImageData(image, 0, 0);
}

async function update(pixels) {
  window.lenet.lastInput = Array.from(pixels);
  showInput(pixels);
  const result = await classify(pixels);
  showPredictions(result.probabilities);
  showMaps("conv1", result.conv1);
  showMaps("conv2", result.conv2);
  element("status").textContent = "";
  window.lenet.updates += 1;
  return result;
}

function rgbaOf(canvas) {
  return canvas.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, canvas.width, canvas.height).data;
}

// --- Drawing -----------------------------------------------------------
const pad = element("pad");
const padContext = pad.getContext("2d", { willReadFrequently: true });
let pendingFrame = null, lastPoint = null;

function clearPad() {
  padContext.fillStyle = "#000";
  padContext.fillRect(0, 0, pad.width, pad.height);
}

function scheduleUpdate() {
  if (pendingFrame !== null) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = null;
    update(preprocessRGBA(rgbaOf(pad), pad.width, pad.height, constants, "no")).catch(reportError);
  });
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

function drawTo(point) {
  padContext.strokeStyle = "#fff";
  padContext.lineWidth = STROKE_WIDTH;
  padContext.lineCap = "round";
  padContext.lineJoin = "round";
  padContext.beginPath();
  padContext.moveTo(...(lastPoint || point));
  padContext.lineTo(...point);
  padContext.stroke();
  lastPoint = point;
  scheduleUpdate();
}

pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  lastPoint = null;
  drawTo(padPoint(event));
});
pad.addEventListener("pointermove", (event) => { if (lastPoint) drawTo(padPoint(event)); });
for (const name of ["pointerup", "pointercancel"]) pad.addEventListener(name, () => { lastPoint = null; });

element("clear").addEventListener("click", () => {
  clearPad();
  element("predictions").replaceChildren();
  for (const id of ["conv1", "conv2"]) element(id).replaceChildren();
  showMessage("");
});

// --- Files -------------------------------------------------------------
// Width and height from a PNG, GIF or JPEG header, so a huge picture is refused before it is decoded.
function headerSize(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length >= 24 && bytes[0] === 0x89 && bytes[1] === 0x50) return [view.getUint32(16), view.getUint32(20)];
  if (bytes.length >= 10 && bytes[0] === 0x47 && bytes[1] === 0x49) return [view.getUint16(6, true), view.getUint16(8, true)];
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    for (let offset = 2; offset + 9 < bytes.length;) {
      if (bytes[offset] !== 0xff) { offset++; continue; }
      const marker = bytes[offset + 1];
      const isFrame = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
      if (isFrame) return [view.getUint16(offset + 7), view.getUint16(offset + 5)];
      offset += 2 + view.getUint16(offset + 2);
    }
  }
  return null;
}

async function preprocessFile(file) {
  if (file.size > constants.max_file_bytes) {
    throw new UserError(`${file.name}: the file is ${Math.round(file.size / 2 ** 20)} MiB, more than the ` +
      `${constants.max_file_bytes / 2 ** 20} MiB limit.`);
  }
  const head = new Uint8Array(await file.slice(0, 65536).arrayBuffer());
  const declared = headerSize(head);
  const tooBig = ([width, height]) => width * height > constants.max_pixels;
  const refuse = ([width, height]) => new UserError(`${file.name}: ${width}x${height} pixels is more than the ` +
    `${constants.max_pixels.toLocaleString("en")} pixel limit.`);
  if (declared && tooBig(declared)) throw refuse(declared);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none",
      imageOrientation: "from-image" });
  } catch {
    throw new UserError(`${file.name}: not an image this browser can read.`);
  }
  if (tooBig([bitmap.width, bitmap.height])) throw refuse([bitmap.width, bitmap.height]);
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const pixels = preprocessRGBA(context.getImageData(0, 0, bitmap.width, bitmap.height).data,
    bitmap.width, bitmap.height, constants, "auto");
  showOnPad(bitmap);
  return pixels;
}

function showOnPad(bitmap) {
  clearPad();
  const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
  const width = bitmap.width * scale, height = bitmap.height * scale;
  padContext.drawImage(bitmap, (pad.width - width) / 2, (pad.height - height) / 2, width, height);
}

class UserError extends Error {}

function reportError(error) {
  showMessage(error instanceof UserError ? error.message : `Something went wrong: ${error.message}`);
}

async function openFile(file) {
  showMessage("");
  try {
    await update(await preprocessFile(file));
  } catch (error) {
    reportError(error);
  }
}

element("file").addEventListener("change", (event) => {
  if (event.target.files.length) openFile(event.target.files[0]);
  event.target.value = "";
});
document.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  if (event.dataTransfer.files.length) openFile(event.dataTransfer.files[0]);
});

// --- What tests and other scripts call ----------------------------------
async function benchmark(calls = 200) {
  const pixels = new Uint8Array(constants.image_size ** 2);
  for (let warm = 0; warm < 20; warm++) await classify(pixels);
  const times = [];
  for (let call = 0; call < calls; call++) {
    const start = performance.now();
    await classify(pixels);
    times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  return { calls, p50_ms: times[Math.floor(calls * 0.5)], p99_ms: times[Math.min(calls - 1, Math.floor(calls * 0.99))] };
}

window.lenet = {
  updates: 0,
  lastInput: null,
  classify,
  preprocessRGBA: (rgba, width, height, invert = "auto") => Array.from(preprocessRGBA(rgba, width, height, constants, invert)),
  benchmark,
  ready: load().then(() => {
    clearPad();
    element("status").textContent = "Draw something, or open an image.";
    return true;
  }).catch((error) => {
    showMessage(`The model could not be loaded: ${error.message}`);
    return false;
  }),
};
