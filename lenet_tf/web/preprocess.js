// Turning a picture into the model's 28x28 input, exactly as lenet_tf/images.py
// does in Python (so the page and `lenet-tf predict` give the same answers).
// The constants come from model.json ("preprocessing"), written by the export
// from the same Python definitions. Pure functions, no DOM: Node can run them too.

// Python's round(): halves go to the even neighbour.
export function roundHalfEven(value) {
  const floor = Math.floor(value);
  const difference = value - floor;
  if (difference > 0.5) return floor + 1;
  if (difference < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

// numpy's median of a list of numbers.
function median(values) {
  const sorted = Float64Array.from(values).sort();
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

// RGBA bytes (as a canvas gives them) -> grey levels, light object on dark.
// Grey is Pillow's "L" conversion (ITU-R 601-2 luma, in its fixed-point form);
// transparent pixels are composited onto black as Pillow's alpha_composite does
// (white when the caller says the picture is dark-on-light).
export function toGrey(rgba, width, height, invert, constants) {
  const grey = new Float64Array(width * height);
  const background = invert === "yes" ? 255 : 0;
  for (let index = 0; index < width * height; index++) {
    let red = rgba[4 * index], green = rgba[4 * index + 1], blue = rgba[4 * index + 2];
    const alpha = rgba[4 * index + 3];
    if (alpha < 255) {
      [red, green, blue] = [red, green, blue].map((channel) => compositeOver(channel, alpha, background));
    }
    grey[index] = (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16;
  }
  if (invert === "yes" || (invert === "auto" && borderLevel(grey, width, height) > constants.light_border)) {
    for (let index = 0; index < grey.length; index++) grey[index] = 255 - grey[index];
  }
  return grey;
}

// One channel of an RGBA pixel over an opaque background, in Pillow's integer arithmetic.
function compositeOver(channel, alpha, background) {
  const precision = 7;
  const coefficient1 = Math.floor((alpha * 255 * 255 * (1 << precision)) / (255 * 255));
  const coefficient2 = 255 * (1 << precision) - coefficient1;
  const mixed = channel * coefficient1 + background * coefficient2 + (0x80 << precision);
  return (((mixed >> 8) + mixed) >> 8) >> precision;
}

export function borderLevel(grey, width, height) {
  const border = [];
  for (let column = 0; column < width; column++) border.push(grey[column]);
  for (let column = 0; column < width; column++) border.push(grey[(height - 1) * width + column]);
  for (let row = 0; row < height; row++) border.push(grey[row * width]);
  for (let row = 0; row < height; row++) border.push(grey[row * width + width - 1]);
  return median(border);
}

function objectBox(grey, width, height, constants) {
  let peak = 0;
  for (const value of grey) peak = Math.max(peak, value);
  if (peak <= 0) return null;
  const threshold = constants.object_threshold * peak;
  let top = height, bottom = -1, left = width, right = -1;
  for (let row = 0; row < height; row++) {
    for (let column = 0; column < width; column++) {
      if (grey[row * width + column] > threshold) {
        top = Math.min(top, row); bottom = Math.max(bottom, row);
        left = Math.min(left, column); right = Math.max(right, column);
      }
    }
  }
  return { top, bottom, left, right };
}

function centre(grey, width, height, constants, box) {
  if (constants.centre === "mass") {
    let total = 0, rows = 0, columns = 0;
    for (let row = 0; row < height; row++) {
      for (let column = 0; column < width; column++) {
        const value = grey[row * width + column];
        total += value; rows += row * value; columns += column * value;
      }
    }
    return [rows / total, columns / total];
  }
  return [(box.top + box.bottom) / 2, (box.left + box.right) / 2];
}

// A 28x28 picture already framed as the dataset frames its images is used as it is.
export function isFramed(grey, constants) {
  const size = constants.image_size;
  const box = objectBox(grey, size, size, constants);
  if (box === null) return true;
  const longest = Math.max(box.bottom - box.top, box.right - box.left) + 1;
  if (longest < constants.longest_side - constants.framed_size_tolerance || longest > constants.longest_side + 1) {
    return false;
  }
  const [row, column] = centre(grey, size, size, constants, box);
  const middle = (size - 1) / 2;
  return Math.abs(row - middle) <= constants.framed_centre_tolerance &&
    Math.abs(column - middle) <= constants.framed_centre_tolerance;
}

// Pillow's Lanczos (a = 3) resampling of 8-bit grey, in its fixed-point arithmetic:
// one pass per axis that changes size, horizontal first, rounded to 8 bits in between.
const PRECISION_BITS = 32 - 8 - 2;

function sinc(x) {
  if (x === 0) return 1;
  const scaled = x * Math.PI;
  return Math.sin(scaled) / scaled;
}

function lanczos(x) {
  return -3 <= x && x < 3 ? sinc(x) * sinc(x / 3) : 0;
}

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 3 * filterScale;
  const kernelSize = Math.ceil(support) * 2 + 1;
  const bounds = [], weights = [];
  for (let out = 0; out < outSize; out++) {
    const middle = (out + 0.5) * scale;
    const first = Math.max(0, Math.trunc(middle - support + 0.5));
    const last = Math.min(inSize, Math.trunc(middle + support + 0.5));
    const kernel = [];
    let sum = 0;
    for (let x = 0; x < last - first; x++) {
      const weight = lanczos((x + first - middle + 0.5) / filterScale);
      kernel.push(weight);
      sum += weight;
    }
    const fixed = new Int32Array(kernelSize);
    kernel.forEach((weight, x) => {
      const normalised = sum !== 0 ? weight / sum : weight;
      fixed[x] = Math.trunc(normalised < 0 ? -0.5 + normalised * (1 << PRECISION_BITS)
        : 0.5 + normalised * (1 << PRECISION_BITS));
    });
    bounds.push([first, last - first]);
    weights.push(fixed);
  }
  return { bounds, weights };
}

function clip8(accumulated) {
  // An arithmetic shift right, as the C code does, then clamp to a byte.
  return Math.min(255, Math.max(0, Math.floor(accumulated / (1 << PRECISION_BITS))));
}

function resamplePass(pixels, width, height, outSize, horizontal) {
  const { bounds, weights } = coefficients(horizontal ? width : height, outSize);
  const outWidth = horizontal ? outSize : width, outHeight = horizontal ? height : outSize;
  const out = new Uint8Array(outWidth * outHeight);
  for (let row = 0; row < outHeight; row++) {
    for (let column = 0; column < outWidth; column++) {
      const [first, count] = bounds[horizontal ? column : row];
      const kernel = weights[horizontal ? column : row];
      let accumulated = 1 << (PRECISION_BITS - 1);
      for (let k = 0; k < count; k++) {
        const source = horizontal ? pixels[row * width + first + k] : pixels[(first + k) * width + column];
        accumulated += source * kernel[k];
      }
      out[row * outWidth + column] = clip8(accumulated);
    }
  }
  return out;
}

export function resizeLanczos(pixels, width, height, outWidth, outHeight) {
  let current = pixels;
  if (outWidth !== width) current = resamplePass(current, width, height, outWidth, true);
  if (outHeight !== height) current = resamplePass(current, outWidth, height, outHeight, false);
  return current;
}

// Crop to the object, scale its longer side to the recipe's size keeping the
// aspect ratio, centre it on a black 28x28 canvas as the dataset was made.
export function frame(grey, width, height, constants) {
  const size = constants.image_size;
  const canvas = new Uint8Array(size * size);
  const box = objectBox(grey, width, height, constants);
  if (box === null) return canvas;
  const cropHeight = box.bottom - box.top + 1, cropWidth = box.right - box.left + 1;
  const cropped = new Uint8Array(cropWidth * cropHeight);
  for (let row = 0; row < cropHeight; row++) {
    for (let column = 0; column < cropWidth; column++) {
      const value = grey[(box.top + row) * width + box.left + column];
      cropped[row * cropWidth + column] = Math.trunc(Math.min(255, Math.max(0, value)));
    }
  }
  const scale = constants.longest_side / Math.max(cropHeight, cropWidth);
  const newHeight = Math.max(1, roundHalfEven(cropHeight * scale));
  const newWidth = Math.max(1, roundHalfEven(cropWidth * scale));
  const resized = resizeLanczos(cropped, cropWidth, cropHeight, newWidth, newHeight);
  const [row, column] = centre(Float64Array.from(resized), newWidth, newHeight, constants,
    { top: 0, bottom: newHeight - 1, left: 0, right: newWidth - 1 });
  const middle = (size - 1) / 2;
  const offsetRow = roundHalfEven(middle - row), offsetColumn = roundHalfEven(middle - column);
  for (let y = 0; y < newHeight; y++) {
    for (let x = 0; x < newWidth; x++) {
      const targetRow = y + offsetRow, targetColumn = x + offsetColumn;
      if (targetRow >= 0 && targetRow < size && targetColumn >= 0 && targetColumn < size) {
        canvas[targetRow * size + targetColumn] = resized[y * newWidth + x];
      }
    }
  }
  return canvas;
}

// Grey levels (light on dark) -> the model's uint8 28x28 input.
export function prepare(grey, width, height, constants) {
  const size = constants.image_size;
  if (width === size && height === size && isFramed(grey, constants)) {
    return Uint8Array.from(grey, (value) => Math.min(255, Math.max(0, roundHalfEven(value))));
  }
  const level = borderLevel(grey, width, height);
  const lifted = Float64Array.from(grey, (value) => Math.min(255, Math.max(0, value - level)));
  return frame(lifted, width, height, constants);
}

// RGBA pixels -> the model's input, the whole way.
export function preprocessRGBA(rgba, width, height, constants, invert = "auto") {
  return prepare(toGrey(rgba, width, height, invert, constants), width, height, constants);
}
