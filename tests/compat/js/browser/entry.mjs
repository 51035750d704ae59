// Bundled by esbuild into the test page: the npm client, unchanged.
import { Centrifuge } from 'centrifuge';
window.Centrifuge = Centrifuge;
