/**
 * Canonical JSON, the byte string that manifests and commands are signed over: object keys sorted at every level
 * (by UTF-16 code units, as `Array.prototype.sort` orders strings), no whitespace, every value written as
 * `JSON.stringify` writes it. Members whose value is `undefined` are left out, as `JSON.stringify` does.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    const text = JSON.stringify(value);
    if (text === undefined) throw new TypeError(`canonicalJson: ${typeof value} has no JSON form`);
    return text;
  }
  if (Array.isArray(value)) {
    return `[${value.map((v) => (v === undefined || typeof v === 'function' || typeof v === 'symbol' ? 'null' : canonicalJson(v))).join(',')}]`;
  }
  const obj = value as Record<string, unknown>;
  const parts: string[] = [];
  for (const key of Object.keys(obj).sort()) {
    const v = obj[key];
    if (v === undefined || typeof v === 'function' || typeof v === 'symbol') continue;
    parts.push(`${JSON.stringify(key)}:${canonicalJson(v)}`);
  }
  return `{${parts.join(',')}}`;
}

/** The signed bytes of a manifest or command: its canonical JSON without the `signature` member. */
export function signedBytes(payload: Readonly<Record<string, unknown>>): Buffer {
  const { signature: _signature, ...rest } = payload;
  return Buffer.from(canonicalJson(rest), 'utf8');
}
