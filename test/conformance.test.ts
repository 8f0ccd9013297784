import * as MemoryStorage from "../src/Storage/Memory.js"
import { conformance } from "../src/testing.js"
import * as MapBasicStorage from "./fixtures/MapBasicStorage.js"

conformance("MemoryStorage", MemoryStorage.layer())

conformance("Storage.fromBasic over a Map", MapBasicStorage.layer)
