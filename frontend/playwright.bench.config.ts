import { defineConfig } from '@playwright/test';
import base from './playwright.config';

// The UI benchmarks (bench/): the same Chromium and preview server as the tests, one worker.
export default defineConfig({
  ...base,
  testDir: 'bench',
  workers: 1,
  retries: 0,
});
