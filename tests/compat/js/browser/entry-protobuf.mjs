// The protobuf build of the npm client, for the protobuf variant of the page.
import { Centrifuge } from 'centrifuge/build/protobuf';
window.Centrifuge = Centrifuge;
