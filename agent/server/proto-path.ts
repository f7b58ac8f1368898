import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findPackageRoot } from '../package-root.js';

export { findPackageRoot };

/** The package's `proto/` directory (the .proto files ship beside `dist/`, not inside it). */
export const PROTO_DIR: string = join(findPackageRoot(dirname(fileURLToPath(import.meta.url))), 'proto');
