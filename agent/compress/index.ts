/**
 * Model compression: int8 (static, QDQ) and fp16 variants of an fp32 ONNX model, measured against it on
 * held-out inputs, and the serving decision made from those measurements.
 */
export { runOptimize, formatReportTable, type OptimizeOptions, type OptimizeResult } from './optimize.js';
export { cosineSimilarity } from './evaluate.js';
export {
  chooseVariant, decideVariant, readVariantReports, GPU_PROVIDERS, REPORT_SUFFIX,
  type AvailableVariants, type CompressedVariant, type ModelReport, type VariantChoiceInput, type VariantDecision,
  type VariantName, type VariantReport,
} from './variant-report.js';
export type { CalibrationMethod } from './calibrate.js';
export { encodeNpy, parseImageSize, type ImageOptions, type ImageSize, type Normalization } from './calibration-data.js';
