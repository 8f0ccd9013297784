import type * as Storage from "../Storage.js"

/**
 * What a memory store holds, for the soak bench and leak tests: read by nothing on a call's path.
 *
 * @internal
 */
export interface MemoryCounts {
  /** Subscriptions to key changes that no one has closed yet. */
  readonly watchers: number
  readonly inFlight: number
  readonly completed: number
}

const memoryStores = new WeakMap<Storage.StorageService, () => MemoryCounts>()

/** @internal */
export const registerMemory = (storage: Storage.StorageService, counts: () => MemoryCounts): void => {
  memoryStores.set(storage, counts)
}

/**
 * The counts of a store built by `MemoryStorage.make`, or `undefined` for any other storage.
 *
 * @internal
 */
export const memoryCounts = (storage: Storage.StorageService): MemoryCounts | undefined => memoryStores.get(storage)?.()
