import { isUtf8 } from "node:buffer"

/**
 * The canonical form of a JSON request body, for the default fingerprint. Two bodies get the same
 * form only when they hold the same JSON document: object members in any order and insignificant
 * whitespace are the same document, nothing else is. In particular:
 *
 * - numbers keep their source text (`12345678901234567890` is not `12345678901234567000`, though
 *   both parse to the same double; `1.0` is not `1` either, which errs on the side of running);
 * - a string is canonical once its escapes are read (`"\u0061"` is `"a"`), lone surrogates
 *   included (`"\ud800"` stays distinct from `"\ufffd"`);
 * - a body that is not one clean JSON document (bytes that are not UTF-8, a byte order mark, an
 *   object with a member name twice, trailing text, ...) has no canonical form: the caller hashes
 *   its bytes instead, so it differs from every clean body, its own deduplicated form included.
 *
 * The body is read in two passes over its bytes, both iterative and linear in its size: the first
 * checks it and records its tokens on a tape of integers (where each token starts and ends, and
 * where each container closes); the second prints the tape, each object's members in name order.
 * Members are printed where they belong rather than moved there, so a body nested 500,000 levels
 * deep costs what 500,000 items side by side cost, and no recursion can overflow the stack. Only
 * an object's member names become JavaScript strings, for sorting.
 *
 * @internal
 */

const enum Token {
  /** A number, `true`, `false`, `null`, or a string without escapes: printed as it is. */
  Plain,
  /** A string with escapes: printed after its escapes are read. */
  Escaped,
  Array,
  Object
}

const enum Byte {
  Tab = 0x09,
  LineFeed = 0x0a,
  CarriageReturn = 0x0d,
  Space = 0x20,
  Quote = 0x22,
  Plus = 0x2b,
  Comma = 0x2c,
  Minus = 0x2d,
  Dot = 0x2e,
  Zero = 0x30,
  Nine = 0x39,
  Colon = 0x3a,
  UpperE = 0x45,
  OpenBracket = 0x5b,
  Backslash = 0x5c,
  CloseBracket = 0x5d,
  LowerE = 0x65,
  OpenBrace = 0x7b,
  CloseBrace = 0x7d
}

/** A growable array of 32-bit integers: the tape and the stacks, without an object per entry. */
class Ints {
  data: Int32Array
  length = 0
  constructor(capacity: number) {
    this.data = new Int32Array(Math.max(16, capacity))
  }
  push(value: number): void {
    if (this.length === this.data.length) {
      const grown = new Int32Array(this.data.length * 2)
      grown.set(this.data)
      this.data = grown
    }
    this.data[this.length++] = value
  }
}

// A token on the tape is three integers: its kind, then for a scalar where it starts and ends in
// the body, for a container the tape position after its last token.
const width = 3

const isWhitespace = (byte: number) =>
  byte === Byte.Space || byte === Byte.LineFeed || byte === Byte.CarriageReturn || byte === Byte.Tab

const isDigit = (byte: number) => byte >= Byte.Zero && byte <= Byte.Nine

/** The end of the RFC 8259 number starting at `start`, or -1. */
const numberEnd = (body: Uint8Array, start: number): number => {
  let i = start
  if (body[i] === Byte.Minus) i++
  if (body[i] === Byte.Zero) {
    i++
  } else {
    if (!isDigit(body[i]!)) return -1
    while (isDigit(body[i]!)) i++
  }
  if (body[i] === Byte.Dot) {
    i++
    if (!isDigit(body[i]!)) return -1
    while (isDigit(body[i]!)) i++
  }
  if (body[i] === Byte.LowerE || body[i] === Byte.UpperE) {
    i++
    if (body[i] === Byte.Plus || body[i] === Byte.Minus) i++
    if (!isDigit(body[i]!)) return -1
    while (isDigit(body[i]!)) i++
  }
  return i
}

const literals: ReadonlyArray<ReadonlyArray<number>> = ["true", "false", "null"].map((word) =>
  Array.from(word, (char) => char.charCodeAt(0))
)

/** The end of `true`, `false` or `null` at `start`, or -1. */
const literalEnd = (body: Uint8Array, start: number): number => {
  for (const word of literals) {
    if (body[start] !== word[0]) continue
    for (let j = 1; j < word.length; j++) if (body[start + j] !== word[j]) return -1
    return start + word.length
  }
  return -1
}

/**
 * Reads the string token at `start` (a quote): pushes it on the tape and returns where it ends,
 * or -1 when it is not closed or holds a raw control character. Bytes of multi-byte UTF-8
 * characters are all 0x80 or above, so they never look like a quote, a backslash or a control.
 * Escapes are checked when the string is printed.
 */
const readString = (body: Uint8Array, start: number, tape: Ints): number => {
  let escaped = false
  let i = start + 1
  while (i < body.length) {
    const byte = body[i]!
    if (byte === Byte.Quote) {
      tape.push(escaped ? Token.Escaped : Token.Plain)
      tape.push(start)
      tape.push(i + 1)
      return i + 1
    }
    if (byte === Byte.Backslash) {
      escaped = true
      i += 2
    } else if (byte < Byte.Space) {
      return -1
    } else {
      i++
    }
  }
  return -1
}

const enum Expect {
  /** A value: at the start, after `:`, after an array's `,`. */
  Value,
  /** A value or `]`, right after `[`. */
  ValueOrClose,
  /** A member name, after an object's `,`. */
  Name,
  /** A member name or `}`, right after `{`. */
  NameOrClose,
  /** `:` after a member name. */
  Colon,
  /** `,` or the container's closing bracket, after a value. */
  Next
}

/** The tape of `body`, or `undefined` when it is not one JSON document. */
const scan = (body: Uint8Array): Ints | undefined => {
  const tape = new Ints(Math.min(body.length, 4096) * width)
  // Tape positions of the open containers.
  const open = new Ints(64)
  let expect = Expect.Value
  let done = false
  // Ends the innermost open container: its start records where it ends.
  const close = (parent: number) => {
    tape.data[parent + 1] = tape.length
    open.length--
    done = open.length === 0
  }
  let i = 0
  const length = body.length

  while (true) {
    while (i < length && isWhitespace(body[i]!)) i++
    if (i === length) return done ? tape : undefined
    if (done) return undefined // text after the document
    const byte = body[i]!
    const parent = open.length === 0 ? -1 : open.data[open.length - 1]!
    const inObject = parent !== -1 && tape.data[parent] === Token.Object

    switch (expect) {
      case Expect.Next: {
        if (byte === Byte.Comma) {
          expect = inObject ? Expect.Name : Expect.Value
          i++
          continue
        }
        if (byte !== (inObject ? Byte.CloseBrace : Byte.CloseBracket)) return undefined
        i++
        close(parent)
        continue
      }
      case Expect.Colon: {
        if (byte !== Byte.Colon) return undefined
        i++
        expect = Expect.Value
        continue
      }
      case Expect.Name:
      case Expect.NameOrClose: {
        if (byte === Byte.CloseBrace && expect === Expect.NameOrClose) {
          i++
          close(parent)
          expect = Expect.Next
          continue
        }
        if (byte !== Byte.Quote) return undefined
        i = readString(body, i, tape)
        if (i === -1) return undefined
        expect = Expect.Colon
        continue
      }
      case Expect.Value:
      case Expect.ValueOrClose: {
        if (byte === Byte.CloseBracket && expect === Expect.ValueOrClose) {
          i++
          close(parent)
          expect = Expect.Next
          continue
        }
        if (byte === Byte.OpenBracket || byte === Byte.OpenBrace) {
          open.push(tape.length)
          tape.push(byte === Byte.OpenBracket ? Token.Array : Token.Object)
          tape.push(0) // where it ends, once it does
          tape.push(0)
          i++
          expect = byte === Byte.OpenBracket ? Expect.ValueOrClose : Expect.NameOrClose
          continue
        }
        const end = byte === Byte.Quote
          ? readString(body, i, tape)
          : byte === Byte.Minus || isDigit(byte)
          ? numberEnd(body, i)
          : literalEnd(body, i)
        if (end === -1) return undefined
        if (byte !== Byte.Quote) {
          tape.push(Token.Plain)
          tape.push(i)
          tape.push(end)
        }
        i = end
        expect = Expect.Next
        done = open.length === 0
        continue
      }
    }
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true })
const textEncoder = new TextEncoder()

/** The output: canonical UTF-8 bytes, written once each. */
class Output {
  bytes: Uint8Array
  length = 0
  constructor(capacity: number) {
    this.bytes = new Uint8Array(Math.max(64, capacity))
  }
  reserve(more: number): void {
    if (this.length + more <= this.bytes.length) return
    const grown = new Uint8Array(Math.max(this.bytes.length * 2, this.length + more))
    grown.set(this.bytes.subarray(0, this.length))
    this.bytes = grown
  }
  byte(value: number): void {
    this.reserve(1)
    this.bytes[this.length++] = value
  }
  copy(body: Uint8Array, start: number, end: number): void {
    this.reserve(end - start)
    this.bytes.set(body.subarray(start, end), this.length)
    this.length += end - start
  }
  text(value: string): void {
    // At most three UTF-8 bytes per UTF-16 code unit.
    this.reserve(value.length * 3)
    this.length += textEncoder.encodeInto(value, this.bytes.subarray(this.length)).written
  }
}

/** The string a token holds, escapes read; `undefined` for a bad escape. */
const stringOf = (body: Uint8Array, tape: Int32Array, token: number): string | undefined => {
  const start = tape[token + 1]!
  const end = tape[token + 2]!
  if (tape[token] === Token.Plain) return utf8.decode(body.subarray(start + 1, end - 1))
  try {
    return JSON.parse(utf8.decode(body.subarray(start, end))) as string
  } catch {
    return undefined
  }
}

/** Prints the string token at `token` canonically; `false` for a bad escape. */
const printString = (body: Uint8Array, tape: Int32Array, token: number, out: Output): boolean => {
  // Without escapes the token is canonical already: its bytes are UTF-8 (so no lone surrogate)
  // and it holds no control character, quote or backslash that `JSON.stringify` would escape.
  if (tape[token] === Token.Plain) {
    out.copy(body, tape[token + 1]!, tape[token + 2]!)
    return true
  }
  const value = stringOf(body, tape, token)
  if (value === undefined) return false
  out.text(JSON.stringify(value))
  return true
}

/** The tape position after the value at `token`. */
const after = (tape: Int32Array, token: number): number =>
  tape[token] === Token.Array || tape[token] === Token.Object ? tape[token + 1]! : token + width

/**
 * The member names of the object at `token`, as tape positions, in name order (UTF-16 code
 * units); `undefined` when a name comes twice (next to each other, once sorted) or has a bad escape.
 */
const membersInOrder = (body: Uint8Array, tape: Int32Array, token: number): Array<number> | undefined => {
  const end = tape[token + 1]!
  const positions: Array<number> = []
  const names: Array<string> = []
  for (let member = token + width; member < end; member = after(tape, member + width)) {
    const name = stringOf(body, tape, member)
    if (name === undefined) return undefined
    positions.push(member)
    names.push(name)
  }
  const order = names.map((_, i) => i).sort((a, b) => names[a]! < names[b]! ? -1 : names[a]! > names[b]! ? 1 : 0)
  for (let j = 1; j < order.length; j++) if (names[order[j - 1]!] === names[order[j]!]) return undefined
  return order.map((i) => positions[i]!)
}

/**
 * Prints the tape. A stack of open containers, not recursion: three integers per container (for
 * an array: the tape position of its next item, of its first item, and where it ends; for an
 * object: the index of its next member in its order, then -1, -1), and the member order of each
 * open object.
 */
const print = (body: Uint8Array, tape: Int32Array): Uint8Array | undefined => {
  const out = new Output(body.length)
  const frames = new Ints(64 * 3)
  const orders: Array<Array<number>> = []

  // Prints a scalar, or opens a container; `false` when the body turns out not to be clean.
  const value = (token: number): boolean => {
    const kind = tape[token]
    if (kind === Token.Plain) {
      out.copy(body, tape[token + 1]!, tape[token + 2]!)
      return true
    }
    if (kind === Token.Escaped) return printString(body, tape, token, out)
    if (kind === Token.Array) {
      out.byte(Byte.OpenBracket)
      frames.push(token + width)
      frames.push(token + width)
      frames.push(tape[token + 1]!)
      return true
    }
    const order = membersInOrder(body, tape, token)
    if (order === undefined) return false
    out.byte(Byte.OpenBrace)
    frames.push(0)
    frames.push(-1)
    frames.push(-1)
    orders.push(order)
    return true
  }

  if (!value(0)) return undefined
  while (frames.length > 0) {
    const top = frames.length - 3
    const data = frames.data
    const end = data[top + 2]!
    if (end !== -1) {
      const item = data[top]!
      if (item === end) {
        out.byte(Byte.CloseBracket)
        frames.length = top
        continue
      }
      if (item !== data[top + 1]) out.byte(Byte.Comma)
      data[top] = after(tape, item)
      if (!value(item)) return undefined
    } else {
      const order = orders[orders.length - 1]!
      const index = data[top]!
      if (index === order.length) {
        out.byte(Byte.CloseBrace)
        frames.length = top
        orders.pop()
        continue
      }
      data[top] = index + 1
      if (index > 0) out.byte(Byte.Comma)
      const name = order[index]!
      if (!printString(body, tape, name, out)) return undefined
      out.byte(Byte.Colon)
      if (!value(name + width)) return undefined
    }
  }
  return out.bytes.subarray(0, out.length)
}

/**
 * The canonical UTF-8 bytes of `body` read as JSON, or `undefined` when it is not one clean JSON
 * document in UTF-8.
 *
 * @internal
 */
export const canonicalize = (body: Uint8Array): Uint8Array | undefined => {
  if (!isUtf8(body)) return undefined
  const tape = scan(body)
  return tape === undefined ? undefined : print(body, tape.data)
}
