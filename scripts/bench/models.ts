import { buildClassifier } from '../demo-models.js';

/**
 * A conv net of realistic size for the GPU check: 224×224 RGB in, 1000 logits out, six 3×3 Conv+Relu stages
 * (strides 2,1,2,2,1,2: 224→112→112→56→28→28→14), about 3.9 M parameters and 2.1 GMAC per frame — the order
 * of a ResNet-18, built from the demo classifier's deterministic builder so every build is identical.
 */
export const CONV224_STAGES: readonly { readonly channels: number; readonly stride: number }[] = [
  { channels: 32, stride: 2 }, { channels: 64, stride: 1 }, { channels: 128, stride: 2 },
  { channels: 256, stride: 2 }, { channels: 512, stride: 1 }, { channels: 512, stride: 2 },
];

export function buildConv224(): Uint8Array {
  return buildClassifier({ size: 224, classes: 1000, stages: CONV224_STAGES });
}
