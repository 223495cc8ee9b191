// After tsc: each build folder says how Node should load its .js files (the package's own
// "type" applies otherwise), so `import` gets dist/esm and `require` gets dist/cjs.
import { writeFile } from "node:fs/promises";

await writeFile(new URL("../dist/esm/package.json", import.meta.url), '{ "type": "module" }\n');
await writeFile(new URL("../dist/cjs/package.json", import.meta.url), '{ "type": "commonjs" }\n');
