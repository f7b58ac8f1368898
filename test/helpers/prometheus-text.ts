/**
 * A strict parser of the Prometheus text exposition format 0.0.4
 * (https://prometheus.io/docs/instrumenting/exposition_formats/), for tests: it throws on anything a
 * Prometheus server would reject or that breaks the format's rules, naming the line. Values are read as Go's
 * ParseFloat reads them (the Prometheus server's parser), so `Nan`/`inf` in any case are accepted.
 *
 * Checked: metric and label name syntax, label value escapes (only \\ \" \n), value syntax (floats, +Inf,
 * -Inf, NaN) and optional integer timestamp; at most one HELP and one TYPE per family, TYPE before the
 * family's first sample; a family's samples contiguous; no duplicate series; counters non-negative;
 * histograms: only _bucket/_sum/_count samples, every bucket with `le`, buckets cumulative (non-decreasing
 * with le), a `+Inf` bucket equal to _count for each label set; summaries: `quantile` label on plain samples,
 * _sum and _count; text ends with a newline.
 */
export type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
  readonly timestamp?: number;
}

export interface MetricFamily {
  readonly name: string;
  type: MetricType;
  help?: string;
  readonly samples: Sample[];
}

export class ExpositionError extends Error {
  constructor(lineNo: number, line: string, problem: string) {
    super(`line ${lineNo}: ${problem}: ${JSON.stringify(line)}`);
    this.name = 'ExpositionError';
  }
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const FLOAT = /^[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)$/;
const TYPES: readonly MetricType[] = ['counter', 'gauge', 'histogram', 'summary', 'untyped'];

/** Go's strconv.ParseFloat, as Prometheus uses it: inf/infinity/nan in any case (prom-client writes `Nan`). */
function parseValue(raw: string): number | undefined {
  const lower = raw.toLowerCase();
  if (lower === '+inf' || lower === 'inf' || lower === '+infinity' || lower === 'infinity') return Infinity;
  if (lower === '-inf' || lower === '-infinity') return -Infinity;
  if (lower === 'nan') return NaN;
  return FLOAT.test(raw) ? Number(raw) : undefined;
}

/** The family a sample belongs to, given the declared types (histogram/summary suffixes). */
function familyOf(sampleName: string, types: ReadonlyMap<string, MetricType>): string {
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (sampleName.endsWith(suffix)) {
      const base = sampleName.slice(0, -suffix.length);
      const t = types.get(base);
      if (t === 'histogram' || (t === 'summary' && suffix !== '_bucket')) return base;
    }
  }
  return sampleName;
}

function parseSampleLine(line: string, lineNo: number): Sample {
  let i = 0;
  const fail = (problem: string): never => { throw new ExpositionError(lineNo, line, problem); };
  while (i < line.length && line[i] !== '{' && line[i] !== ' ' && line[i] !== '\t') i += 1;
  const name = line.slice(0, i);
  if (!METRIC_NAME.test(name)) fail(`invalid metric name '${name}'`);
  const labels: Record<string, string> = {};
  if (line[i] === '{') {
    i += 1;
    for (;;) {
      while (line[i] === ' ') i += 1;
      if (line[i] === '}') { i += 1; break; }
      const start = i;
      while (i < line.length && /[a-zA-Z0-9_]/.test(line[i]!)) i += 1;
      const lname = line.slice(start, i);
      if (!LABEL_NAME.test(lname)) fail(`invalid label name '${lname}'`);
      if (lname.startsWith('__')) fail(`label name '${lname}' is reserved`);
      if (line[i] !== '=') fail(`expected '=' after label '${lname}'`);
      i += 1;
      if (line[i] !== '"') fail(`expected '"' to open the value of label '${lname}'`);
      i += 1;
      let value = '';
      for (;;) {
        if (i >= line.length) fail(`unterminated value of label '${lname}'`);
        const c = line[i]!;
        if (c === '\\') {
          const n = line[i + 1];
          if (n === '\\') value += '\\';
          else if (n === '"') value += '"';
          else if (n === 'n') value += '\n';
          else fail(`invalid escape '\\${n ?? ''}' in label '${lname}'`);
          i += 2;
        } else if (c === '"') {
          i += 1;
          break;
        } else {
          value += c;
          i += 1;
        }
      }
      if (lname in labels) fail(`label '${lname}' given twice`);
      labels[lname] = value;
      while (line[i] === ' ') i += 1;
      if (line[i] === ',') { i += 1; continue; }
      if (line[i] === '}') { i += 1; break; }
      fail(`expected ',' or '}' after label '${lname}'`);
    }
  }
  const rest = line.slice(i).trim().split(/[ \t]+/);
  if (line[i] !== ' ' && line[i] !== '\t') fail('expected whitespace before the value');
  if (rest.length < 1 || rest.length > 2 || rest[0] === '') fail('expected a value and an optional timestamp');
  const value = parseValue(rest[0]!);
  if (value === undefined) fail(`invalid value '${rest[0]}'`);
  let timestamp: number | undefined;
  if (rest.length === 2) {
    if (!/^-?\d+$/.test(rest[1]!)) fail(`invalid timestamp '${rest[1]}'`);
    timestamp = Number(rest[1]);
  }
  return timestamp === undefined ? { name, labels, value: value! } : { name, labels, value: value!, timestamp };
}

function seriesKey(s: Sample): string {
  return `${s.name}{${Object.keys(s.labels).sort().map((k) => `${k}=${JSON.stringify(s.labels[k])}`).join(',')}}`;
}

function checkHistogram(f: MetricFamily): void {
  const groups = new Map<string, { buckets: { le: number; value: number }[]; count?: number; sum?: number }>();
  for (const s of f.samples) {
    const { le, ...rest } = s.labels;
    const key = JSON.stringify(Object.keys(rest).sort().map((k) => [k, rest[k]]));
    let g = groups.get(key);
    if (!g) { g = { buckets: [] }; groups.set(key, g); }
    if (s.name === `${f.name}_bucket`) {
      if (le === undefined) throw new Error(`histogram ${f.name}: bucket without 'le' label`);
      const bound = parseValue(le);
      if (bound === undefined || Number.isNaN(bound)) throw new Error(`histogram ${f.name}: invalid le '${le}'`);
      g.buckets.push({ le: bound, value: s.value });
    } else if (s.name === `${f.name}_count`) {
      if (le !== undefined) throw new Error(`histogram ${f.name}: _count with 'le'`);
      g.count = s.value;
    } else if (s.name === `${f.name}_sum`) {
      if (le !== undefined) throw new Error(`histogram ${f.name}: _sum with 'le'`);
      g.sum = s.value;
    } else {
      throw new Error(`histogram ${f.name}: unexpected sample ${s.name}`);
    }
  }
  for (const [key, g] of groups) {
    if (g.count === undefined || g.sum === undefined) throw new Error(`histogram ${f.name} ${key}: missing _count or _sum`);
    const sorted = [...g.buckets].sort((a, b) => a.le - b.le);
    if (sorted.length === 0 || sorted.at(-1)!.le !== Infinity) throw new Error(`histogram ${f.name} ${key}: no +Inf bucket`);
    for (let i = 1; i < sorted.length; i += 1) {
      if (sorted[i]!.le === sorted[i - 1]!.le) throw new Error(`histogram ${f.name} ${key}: bucket le=${sorted[i]!.le} twice`);
      if (sorted[i]!.value < sorted[i - 1]!.value) throw new Error(`histogram ${f.name} ${key}: buckets not cumulative at le=${sorted[i]!.le}`);
    }
    if (sorted.at(-1)!.value !== g.count) throw new Error(`histogram ${f.name} ${key}: +Inf bucket ${sorted.at(-1)!.value} != _count ${g.count}`);
  }
}

export function parsePrometheusText(text: string): Map<string, MetricFamily> {
  if (text !== '' && !text.endsWith('\n')) throw new Error('exposition does not end with a newline');
  const families = new Map<string, MetricFamily>();
  const types = new Map<string, MetricType>();
  const seenSeries = new Set<string>();
  const closed = new Set<string>();
  let current: string | undefined;
  const lines = text.split('\n');
  lines.pop();
  const family = (name: string): MetricFamily => {
    let f = families.get(name);
    if (!f) { f = { name, type: 'untyped', samples: [] }; families.set(name, f); }
    return f;
  };
  lines.forEach((line, idx) => {
    const lineNo = idx + 1;
    if (line.trim() === '') return;
    if (line.startsWith('#')) {
      const m = /^#[ \t]+(HELP|TYPE)[ \t]+(\S+)(?:[ \t]+(.*))?$/.exec(line);
      if (!m) return; // a plain comment
      const [, kind, name, rest] = m;
      if (!METRIC_NAME.test(name!)) throw new ExpositionError(lineNo, line, `invalid metric name '${name}'`);
      const f = family(name!);
      if (kind === 'HELP') {
        if (f.help !== undefined) throw new ExpositionError(lineNo, line, `second HELP for ${name}`);
        const help = rest ?? '';
        if (/\\[^\\n]/.test(help.replace(/\\\\/g, ''))) throw new ExpositionError(lineNo, line, 'invalid escape in HELP');
        f.help = help.replace(/\\n/g, '\n').replace(/\\\\/g, '\\');
      } else {
        if (types.has(name!)) throw new ExpositionError(lineNo, line, `second TYPE for ${name}`);
        if (f.samples.length > 0) throw new ExpositionError(lineNo, line, `TYPE for ${name} after its samples`);
        const type = (rest ?? '').trim() as MetricType;
        if (!TYPES.includes(type)) throw new ExpositionError(lineNo, line, `unknown type '${rest ?? ''}'`);
        types.set(name!, type);
        f.type = type;
      }
      return;
    }
    const sample = parseSampleLine(line, lineNo);
    const fname = familyOf(sample.name, types);
    if (current !== fname) {
      if (closed.has(fname)) throw new ExpositionError(lineNo, line, `samples of ${fname} are not contiguous`);
      if (current !== undefined) closed.add(current);
      current = fname;
    }
    const key = seriesKey(sample);
    if (seenSeries.has(key)) throw new ExpositionError(lineNo, line, `duplicate series ${key}`);
    seenSeries.add(key);
    const f = family(fname);
    if (f.type === 'counter' && !(sample.value >= 0)) throw new ExpositionError(lineNo, line, 'counter value must be >= 0');
    if ('le' in sample.labels && f.type !== 'histogram') throw new ExpositionError(lineNo, line, `'le' label outside a histogram`);
    if (f.type === 'summary' && sample.name === fname && !('quantile' in sample.labels)) throw new ExpositionError(lineNo, line, 'summary sample without quantile');
    f.samples.push(sample);
  });
  for (const f of families.values()) if (f.type === 'histogram') checkHistogram(f);
  return families;
}

/** The value of one series, or undefined. `labels` must match exactly. */
export function sampleValue(families: ReadonlyMap<string, MetricFamily>, family: string, sampleName: string, labels: Record<string, string>): number | undefined {
  const f = families.get(family);
  const want = JSON.stringify(Object.entries(labels).sort());
  return f?.samples.find((s) => s.name === sampleName && JSON.stringify(Object.entries(s.labels).sort()) === want)?.value;
}
