// Small helpers for concurrent operations (internal: not part of the public API).

/**
 * Waits until every operation has settled (none left running: buffers they use are free again),
 * then throws the first failure.
 */
export async function settleAll(ops: readonly Promise<unknown>[]): Promise<void> {
  const rs = await Promise.allSettled(ops);
  for (const r of rs) if (r.status === 'rejected') throw r.reason;
}
