// Format-neutral facts about an open image, in qemu-img's terms; src/cli turns them into text/JSON.

/** One internal snapshot as the snapshot table records it. */
export interface SnapshotInfo {
  id: string;
  name: string;
  /** VM state size in bytes (64-bit extra-data field when present). */
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  /** Guest run time (vm clock) in nanoseconds. */
  vmClockNsec: number;
  /** Record/replay instruction count; undefined when absent or -1 (disabled). */
  icount?: number;
  /** Virtual disk size at snapshot time, when recorded. */
  diskSize?: number;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  /** qemu-img's flag names, in its order: "in-use", "auto". */
  flags: string[];
}

export interface Qcow2SpecificInfo {
  type: 'qcow2';
  /** "0.10" or "1.1". */
  compat: string;
  compressionType: 'zlib' | 'zstd';
  lazyRefcounts?: boolean;
  bitmaps?: BitmapInfo[];
  refcountBits: number;
  corrupt?: boolean;
  extendedL2?: boolean;
  dataFile?: string;
  dataFileRaw?: boolean;
}

export interface ImageInfo {
  /** The name the image was opened by. */
  filename: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** Bytes allocated on the host (qemu-img's "disk size"); undefined when the storage cannot tell. */
  actualSize?: number;
  clusterSize?: number;
  dirtyFlag?: boolean;
  encrypted?: boolean;
  /** Backing file name as stored in the image. */
  backingFilename?: string;
  /** Backing file name resolved against the image's directory. */
  fullBackingFilename?: string;
  backingFilenameFormat?: string;
  snapshots: SnapshotInfo[];
  formatSpecific?: Qcow2SpecificInfo;
}
