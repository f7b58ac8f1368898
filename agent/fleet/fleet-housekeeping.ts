import { readdirSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { errorMessage } from '../errors.js';
import type { FleetStore } from '../store/index.js';
import type { ArtifactDownloader } from './artifact-downloader.js';
import type { DeploymentTarget } from './deployment-target.js';
import { sha256File } from './file-io.js';
import type { FleetLogger } from './fleet-logger.js';

// What the fleet agent puts in order at start, before it resumes deployments or listens.

/**
 * Makes the registry agree with the repository: versions on disk it does not know are hashed and added
 * (everything, after a corrupt database was set aside: `rebuilding`), versions it lists that are gone are
 * marked deleted.
 */
export async function syncRegistry(store: FleetStore, target: DeploymentTarget, logger: FleetLogger, rebuilding: boolean): Promise<void> {
  const registry = store.registry;
  let added = 0;
  for (const model of target.listModels()) {
    const v = target.modelVersions(model);
    const known = new Map((await registry.entries(model)).map((e) => [e.version, e]));
    for (const ver of v.onDisk) {
      const entry = known.get(ver);
      const state = ver === v.active ? 'active' : 'installed';
      if (entry && entry.state !== 'deleted' && entry.state !== 'rolled_back') {
        if (entry.state !== state) await registry.setState(model, ver, state);
        continue;
      }
      const path = target.versionPath(model, ver);
      try {
        await registry.upsert({ model, version: ver, sha256: await sha256File(path), path, state });
        added += 1;
      } catch (err) {
        logger.warn({ model, version: ver, path, err: errorMessage(err) }, 'fleet: could not hash a model version on disk');
      }
    }
    for (const [ver, entry] of known) {
      if (!v.onDisk.includes(ver) && (entry.state === 'active' || entry.state === 'installed')) await registry.setState(model, ver, 'deleted');
    }
  }
  if (rebuilding) logger.warn({ versions: added }, 'fleet: database was corrupt and set aside; model registry rebuilt from the model repository on disk');
}

/** Removes partial downloads no unfinished deployment needs. */
export async function cleanDownloads(store: FleetStore, downloader: ArtifactDownloader): Promise<void> {
  const needed = new Set<string>();
  for (const rec of await store.journal.unfinished()) {
    try {
      needed.add((JSON.parse(rec.manifest) as { artifact?: { sha256?: string } }).artifact?.sha256 ?? '');
    } catch {
      // A stored manifest that is not JSON is failed when the deployment resumes.
    }
  }
  for (const d of await store.chunks.downloads()) if (!needed.has(d.sha256)) await downloader.discard(d.sha256);
  for (const f of readdirSync(downloader.dir)) {
    // `<sha256>.part` is a partial download (kept while a deployment needs it); `<sha256>.<deployment>.claim` is a
    // deployment's link to a verified one, made again by the deployment that resumes, so never kept.
    const part = /^([0-9a-f]{64})\.part$/.exec(f);
    if (!part || !needed.has(part[1] ?? '')) {
      try {
        unlinkSync(join(downloader.dir, f));
      } catch {
        // Gone already.
      }
    }
  }
}
