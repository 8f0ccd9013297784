import { randomUUID } from "node:crypto"

/** @internal */
export const make = (): string => randomUUID()
