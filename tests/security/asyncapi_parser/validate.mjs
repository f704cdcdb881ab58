import { Parser } from '@asyncapi/parser';
import { readFileSync } from 'node:fs';
const parser = new Parser();
const text = readFileSync(process.argv[2], 'utf8');
const { document, diagnostics } = await parser.parse(text);
const errors = diagnostics.filter(d => d.severity === 0);
const out = {
  valid: !!document && errors.length === 0,
  errors: errors.map(d => `${d.code}: ${d.message} at ${d.path.join('.')}`),
  warnings: diagnostics.filter(d => d.severity === 1).map(d => `${d.code}: ${d.message} at ${d.path.join('.')}`),
  channels: document ? document.channels().all().map(c => c.address()) : [],
};
console.log(JSON.stringify(out));
process.exit(out.valid ? 0 : 1);
